"""SD3 inpainting ControlNets (Alimama's: the unit's image is the picture to inpaint, its mask white = repaint)
through the A1111 route, sent by the real ``webuiapi`` client: sd-webui-controlnet's unit ``mask_image`` (webuiapi's
``ControlNetUnit.mask`` sends it as ``mask``), and on img2img a unit without an image takes the init image with the
request's own ``mask``. Each image equals the Python pipeline's with the same unit (equal pixels); a mask on a unit
whose ControlNet has no mask channel is listed in ``info["ignored"]``; what does not fit is a one-line 400 or a
failed job."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
webuiapi = pytest.importorskip("webuiapi")

import sdengine  # noqa: E402
from _a1111_masks import overlay, prepare_mask  # noqa: E402
from _live_server import live_server, server_config  # noqa: E402
from _sd3_models import SIZE, make_sd3_folder  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402
from test_sd3_controlnet_inpaint import _controlnet, _mask, _picture  # noqa: E402

PROMPT, NEGATIVE = "a cat on a bench", "blurry"
STEPS = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111sd3inp")
    models, cns = root / "models", root / "controlnets"
    sd3 = make_sd3_folder(models / "tiny-sd3")
    _controlnet(sd3, cns / "sd3-inpaint", 31, extra_conditioning_channels=1)
    _controlnet(sd3, cns / "sd3-cn", 32)
    pipe = sdengine.load_pipeline(sd3, device="cpu")
    with live_server(server_config(root, models_dir=models, controlnets_dir=cns)) as server:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", scheduler="Automatic")
        yield api, pipe, cns


def _arr(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


KW: dict[str, Any] = dict(seed=9, steps=STEPS, width=SIZE, height=SIZE, cfg_scale=5)


def _python(pipe: Any, units: list, **kw: Any) -> Any:
    return pipe(PROMPT, NEGATIVE, sampler="euler", schedule="normal", controlnets=units, progress=False,
                **KW, **kw).images[0]  # fmt: skip


def test_txt2img_unit_mask_equals_the_pipeline(served):
    api, pipe, cns = served
    picture, mask = _picture(1), _mask()
    unit = webuiapi.ControlNetUnit(image=picture, mask=mask, module="none", model="sd3-inpaint", weight=0.9,
                                   guidance_end=0.8, resize_mode="Just Resize")  # fmt: skip
    r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, controlnet_units=[unit],
                    override_settings={"sd_model_checkpoint": "tiny-sd3"}, **KW)  # fmt: skip
    want = _python(pipe, [ControlUnit(str(cns / "sd3-inpaint"), picture, 0.9, 0.0, 0.8, rule="a1111", mask=mask)])
    np.testing.assert_array_equal(_arr(r.image), _arr(want))
    assert not any("mask" in k for k in r.info.get("ignored", [])), r.info
    # the extension's own name (mask_image) and another mask: another image
    body = unit.to_dict()
    body["mask_image"] = webuiapi.raw_b64_img(mask.transpose(0))
    del body["mask"]
    r2 = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, alwayson_scripts={"controlnet": {"args": [body]}},
                     override_settings={"sd_model_checkpoint": "tiny-sd3"}, **KW)  # fmt: skip
    moved = ControlUnit(str(cns / "sd3-inpaint"), picture, 0.9, 0.0, 0.8, rule="a1111", mask=mask.transpose(0))
    np.testing.assert_array_equal(_arr(r2.image), _arr(_python(pipe, [moved])))
    assert not np.array_equal(_arr(r2.image), _arr(r.image))


def test_img2img_unit_takes_the_init_image_and_the_request_mask(served):
    api, pipe, cns = served
    picture, mask = _picture(2), _mask()

    def img2img(units: list) -> Any:
        return api.img2img(images=[picture], mask_image=mask, mask_blur=0, inpainting_fill=1, denoising_strength=1.0,
                           prompt=PROMPT, negative_prompt=NEGATIVE, controlnet_units=units, resize_mode=0,
                           image_cfg_scale=None, override_settings={"sd_model_checkpoint": "tiny-sd3"},
                           **KW)  # fmt: skip

    r = img2img([webuiapi.ControlNetUnit(module="none", model="sd3-inpaint", resize_mode="Just Resize")])
    # the same as the unit (on the init image) given that mask itself, another mask another image
    own = webuiapi.ControlNetUnit(mask=mask, module="none", model="sd3-inpaint", resize_mode="Just Resize")
    np.testing.assert_array_equal(_arr(r.image), _arr(img2img([own]).image))
    moved = webuiapi.ControlNetUnit(mask=mask.transpose(0), module="none", model="sd3-inpaint",
                                    resize_mode="Just Resize")  # fmt: skip
    assert not np.array_equal(_arr(r.image), _arr(img2img([moved]).image))
    assert not np.array_equal(_arr(r.image), _arr(img2img([]).image))
    # blurred and inverted as the extension's prepare_mask makes the img2img mask for the unit (inverting was
    # refused, and the unit took the mask unblurred): the same as a unit given that prepared mask itself
    args = dict(images=[picture], mask_image=mask, inpainting_fill=1, denoising_strength=1.0, prompt=PROMPT,
                negative_prompt=NEGATIVE, resize_mode=0, image_cfg_scale=None, mask_blur=3, inpainting_mask_invert=1,
                override_settings={"sd_model_checkpoint": "tiny-sd3"}, **KW)  # fmt: skip
    bare = api.img2img(controlnet_units=[webuiapi.ControlNetUnit(module="none", model="sd3-inpaint",
                                                                 resize_mode="Just Resize")], **args)  # fmt: skip
    prepared = prepare_mask(mask, True, 3, 3)
    given = api.img2img(controlnet_units=[webuiapi.ControlNetUnit(mask=prepared, module="none", model="sd3-inpaint",
                                                                  resize_mode="Just Resize")], **args)  # fmt: skip
    np.testing.assert_array_equal(_arr(bare.image), _arr(given.image))
    plain = webuiapi.ControlNetUnit(mask=ImageOps.invert(mask), module="none", model="sd3-inpaint",
                                    resize_mode="Just Resize")  # fmt: skip
    unblurred = api.img2img(controlnet_units=[plain], **args)
    assert not np.array_equal(_arr(bare.image), _arr(unblurred.image))


def _post(api: Any, route: str, unit: dict, **extra: Any) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 1, "cfg_scale": 1,
            "override_settings": {"sd_model_checkpoint": "tiny-sd3"},
            "alwayson_scripts": {"controlnet": {"args": [unit]}}, **extra}  # fmt: skip
    return httpx.post(f"{api.baseurl}/{route}", json=body, timeout=300)


def test_masks_elsewhere_and_refusals(served):
    api, _, _ = served
    picture, mask = webuiapi.raw_b64_img(_picture(3)), webuiapi.raw_b64_img(_mask())
    base = {"image": picture, "module": "none", "resize_mode": "Just Resize"}
    # a mask on a ControlNet without a mask channel: not used, listed as ignored (as on U-Net units)
    r = _post(api, "txt2img", {**base, "model": "sd3-cn", "mask": mask})
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert "controlnet.args[0].mask" in info, info

    def fails(route: str, unit: dict, *needles: str, **extra: Any) -> None:
        r = _post(api, route, unit, **extra)
        assert r.status_code in (400, 500), (r.status_code, r.text)
        msg = str(r.json().get("detail") or r.json().get("error") or r.text)
        assert "\n" not in msg.strip(), msg
        for n in needles:
            assert n in msg, msg

    fails("txt2img", {**base, "model": "sd3-inpaint"}, "is an SD3 inpainting ControlNet", "mask")
    # an RGBA mask with transparency: A1111 reads its alpha, the extension's unit its grey levels (another mask)
    rgba = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (4, 4, 20, 20))
    init = {"init_images": [picture], "mask": webuiapi.raw_b64_img(rgba), "denoising_strength": 1.0}
    fails("img2img", {"module": "none", "model": "sd3-inpaint"}, "RGBA with transparency", "mask_image", **init)


def test_only_masked_crops_the_units_image_and_mask_as_the_extension(served):
    """ "Only masked" inpainting (``inpaint_full_res``, webuiapi's default) with an SD3 inpainting unit: as
    sd-webui-controlnet (its ``inpaint_crop_input_image``, true by default) the unit's image and mask are cut by
    the init image's box and fitted to the output. A unit without an image takes the cut init image before
    "fill" and the cut request mask (once the filled cut and the whole mask squashed into the box: another image),
    so it equals a unit given the same picture and mask itself (once left whole) and the pipeline given the
    cuts; ``inpaint_crop_input_image`` false is a one-line 400."""
    from sdengine.io.resize import resize_image

    api, pipe, cns = served
    picture, mask = _picture(4), _mask()

    def img2img(units: list, fill: int = 0) -> Any:
        return api.img2img(images=[picture], mask_image=mask, mask_blur=0, inpainting_fill=fill, denoising_strength=1.0,
                           prompt=PROMPT, negative_prompt=NEGATIVE, controlnet_units=units, resize_mode=0,
                           inpaint_full_res=True, inpaint_full_res_padding=0, image_cfg_scale=None,
                           override_settings={"sd_model_checkpoint": "tiny-sd3"}, **KW)  # fmt: skip

    bare = img2img([webuiapi.ControlNetUnit(module="none", model="sd3-inpaint", resize_mode="Just Resize")])
    given = img2img([webuiapi.ControlNetUnit(image=picture, mask=mask, module="none", model="sd3-inpaint",
                                             resize_mode="Just Resize")])  # fmt: skip
    np.testing.assert_array_equal(_arr(bare.image), _arr(given.image))
    # the pipeline on the box around A1111's mask (kept grey: every level above 0 is in it, rows 2..21, columns
    # 3..29), grown to the square output: (3, 0, 30, 27); the unit's mask is the request's as sent, cut alike
    box = (3, 0, 30, 27)
    cut = resize_image(picture.crop(box), SIZE, SIZE, "resize and fill")
    cut_mask = resize_image(mask.crop(box), SIZE, SIZE, "resize and fill")
    from sdengine.server.a1111 import masked_fill

    unit_mask = resize_image(mask.crop(box), SIZE, SIZE, "resize and fill")
    unit = ControlUnit(str(cns / "sd3-inpaint"), cut, 1.0, 0.0, 1.0, rule="a1111", mask=unit_mask)
    want = pipe(PROMPT, NEGATIVE, sampler="euler", schedule="normal", controlnets=[unit], progress=False,
                init_image=masked_fill(cut, cut_mask), mask=cut_mask, strength=1.0, **KW).images[0]  # fmt: skip
    canvas = picture.copy()
    canvas.paste(resize_image(want, box[2] - box[0], box[3] - box[1], "crop and resize"), box[:2])
    np.testing.assert_array_equal(_arr(bare.image), _arr(overlay(canvas, picture, mask)))  # A1111's composite
    body = webuiapi.ControlNetUnit(module="none", model="sd3-inpaint").to_dict()
    r = httpx.post(f"{api.baseurl}/img2img", timeout=300, json={
        "prompt": PROMPT, "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 1, "denoising_strength": 1.0,
        "init_images": [webuiapi.raw_b64_img(picture)], "mask": webuiapi.raw_b64_img(mask), "inpaint_full_res": True,
        "override_settings": {"sd_model_checkpoint": "tiny-sd3"},
        "alwayson_scripts": {"controlnet": {"args": [{**body, "inpaint_crop_input_image": False}]}}})  # fmt: skip
    assert r.status_code == 400 and "inpaint_crop_input_image" in r.json()["detail"], r.text
