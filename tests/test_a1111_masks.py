"""A1111's inpainting masks on the A1111 route, against oracles written from A1111's formulas (tests/_a1111_masks.py):
a grey (L / RGB) mask is kept grey (only an RGBA mask's alpha is thresholded, above 128), blurred across and down by
``mask_blur_x`` / ``mask_blur_y`` at its own size in 8 bits, the latent mask rounded from it, the init image "filled"
under it for every masked content but "original", and the result laid over the init image by it (doubled on the
whole picture) with A1111's premultiplied alpha composite. Once a grey mask was thresholded at 128 first: another
image wherever the mask was grey."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from _a1111_masks import create_binary_mask, doubled, fill, mask_blur, overlay
from _emoji_models import make_tiny_emoji_folder
from _live_server import live_server, server_config, shared_loader
from sdengine.io.resize import resize_image
from sdengine.server.a1111 import a1111_mask, blurred_mask

COMMON = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
PROMPT = "a blue ball"
SAMPLER = {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}  # webuiapi's, as the fixture sends them


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("a1111masks")
    make_tiny_emoji_folder(tmp / "models" / "tiny")
    with live_server(server_config(tmp, models_dir=tmp / "models")) as s:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=s.port, sampler="DPM++ 2M", scheduler="Karras")


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def init_image() -> Image.Image:
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(
        np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)], -1)
    )


def grey_mask() -> Image.Image:
    """A block whose left part is grey 100 (below A1111's alpha threshold of 128), its middle 200, its right white."""
    a = np.zeros((64, 64), np.uint8)
    a[12:52, 8:24], a[12:52, 24:40], a[12:52, 40:56] = 100, 200, 255
    return Image.fromarray(a, "L")


def img2img(api, init: Image.Image, mask: Image.Image, **fields) -> tuple[Image.Image, dict]:
    """A raw A1111 img2img request (webuiapi sends no mask_blur_x / _y): the image and the parsed info."""
    body = {"init_images": [webuiapi.raw_b64_img(init)], "mask": webuiapi.raw_b64_img(mask), "prompt": PROMPT}
    r = httpx.post(f"{api.baseurl}/img2img", json={**body, "seed": 3, **SAMPLER, **COMMON, **fields}, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(got["images"][0])))
    return image, json.loads(got["info"])


def pipeline(init: Image.Image, mask: Image.Image, **kw):
    """The Python API on the mask A1111 hands its sampler (blurred already: mask_blur 0), A1111's step count."""
    return shared_loader("emoji", "cpu")(
        PROMPT, seed=3, init_image=init, mask=mask, mask_blur=0, strength=0.8, strength_rule="a1111",
        sampler="dpmpp_2m", schedule="karras", progress=False, **COMMON, **kw,
    ).images[0]  # fmt: skip


def test_masks_are_read_and_blurred_as_a1111_reads_and_blurs_them() -> None:
    """``a1111_mask`` is A1111's ``create_binary_mask`` for every mode (an LA mask's alpha is not read: A1111
    converts it to L), rounded or not; ``blurred_mask`` its separate 8-bit blurs."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    grey[0, :4] = (127, 128, 129, 0)
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    masks = {
        "L": Image.fromarray(grey, "L"),
        "RGB": Image.fromarray(rgb, "RGB"),
        "RGBA transparent": Image.fromarray(np.dstack([rgb, grey]), "RGBA"),
        "RGBA opaque": Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)]), "RGBA"),
        "LA": Image.fromarray(np.dstack([grey[::-1], grey]), "LA"),
    }
    for name, m in masks.items():
        for rounded in (True, False):
            got, want = np.asarray(a1111_mask(m, rounded)), np.asarray(create_binary_mask(m, rounded))
            np.testing.assert_array_equal(got, want, err_msg=f"{name} rounded={rounded}")
    # the grey levels are kept: 127 / 128 / 129 stay (once 0 / 0 / 255)
    assert tuple(np.asarray(a1111_mask(masks["L"]))[0, :3]) == (127, 128, 129)
    assert set(np.unique(np.asarray(a1111_mask(masks["RGBA transparent"])))) == {0, 255}
    for bx, by in ((3, 1), (0, 2.5), (2, 0), (4, 4), (0, 0)):
        got = np.asarray(blurred_mask(masks["L"], (bx, by)))
        np.testing.assert_array_equal(got, np.asarray(mask_blur(masks["L"], bx, by)), err_msg=f"{bx}, {by}")


def test_a_grey_mask_is_kept_grey_and_differs_from_the_thresholded_one_as_in_a1111(api) -> None:
    """Whole picture, masked content "original", different blurs across and down: the answer is A1111's
    (oracle) to the pixel; the same mask thresholded at 128 (what sdengine once did) is another image, the init
    image exactly where the grey was 100, where A1111 (and now sdengine) repaints by the grey level."""
    init, mask = init_image(), grey_mask()
    sent = {"denoising_strength": 0.8, "inpainting_fill": 1, "inpaint_full_res": False}
    results = {}
    for name, m in (("grey", mask), ("hard", mask.point(lambda v: 255 if v > 128 else 0))):
        image, info = img2img(api, init, m, mask_blur_x=3, mask_blur_y=1, **sent)
        blurred = mask_blur(create_binary_mask(m), 3, 1)
        want = overlay(pipeline(init, blurred), init, doubled(blurred))
        np.testing.assert_array_equal(arr(image), arr(want), err_msg=name)
        assert "Mask blur" not in info["infotexts"][0]  # A1111 writes none when the two blurs differ
        results[name] = arr(image).astype(int)
    low = np.zeros((64, 64), bool)
    low[16:48, 10:15] = True  # inside the grey-100 part, beyond the blur of the 200 part's edge (8 columns)
    changed = np.abs(results["grey"] - results["hard"]).max(-1)
    assert (changed[low] > 0).mean() > 0.9  # repainted by 200/255 (100 doubled) in A1111's composite
    np.testing.assert_array_equal(results["hard"][low], arr(init)[low])  # thresholded: the init image kept
    # equal blurs: A1111's "Mask blur" in the infotext (and the PNG's), as A1111 writes it
    image, info = img2img(api, init, mask, mask_blur_x=4, mask_blur_y=4, **sent)
    assert ", Mask blur: 4" in info["infotexts"][0] and image.info["parameters"] == info["infotexts"][0]


def test_latent_masked_contents_fill_the_image_too_as_a1111(api) -> None:
    """A1111 runs masking.fill for every ``inpainting_fill`` but 1 ("original"): "latent noise" and "latent
    nothing" are made from the filled image's latent (once from the init image's), under the grey mask."""
    init, mask = init_image(), grey_mask()
    blurred = mask_blur(mask, 2, 2)
    for fill_mode, content in ((2, "latent noise"), (3, "latent nothing")):
        r = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=3, denoising_strength=0.8, mask_blur=2,
                        inpainting_fill=fill_mode, inpaint_full_res=False, **COMMON)  # fmt: skip
        want = overlay(pipeline(fill(init, blurred), blurred, masked_content=content), init, doubled(blurred))
        np.testing.assert_array_equal(arr(r.image), arr(want), err_msg=content)
        unfilled = overlay(pipeline(init, blurred, masked_content=content), init, doubled(blurred))
        assert not np.array_equal(arr(r.image), arr(unfilled))


def test_only_masked_with_a_grey_mask_as_a1111(api) -> None:
    """ "Only masked": the box around the blurred grey mask (square here, so not grown), the init image and the
    mask cut by it and fitted ("resize and fill"), the result fitted back ("crop and resize") and laid over the
    init image by the blurred mask (not doubled), A1111's composite."""
    init = init_image()
    a = np.zeros((64, 64), np.uint8)
    a[20:40, 20:40] = 90
    a[24:36, 26:40] = 230
    mask = Image.fromarray(a, "L")
    r = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=3, denoising_strength=0.8, mask_blur=2,
                    inpainting_fill=1, inpaint_full_res=True, inpaint_full_res_padding=0, **COMMON)  # fmt: skip
    blurred = mask_blur(mask, 2, 2)
    box = blurred.getbbox()
    assert box is not None and box[2] - box[0] == box[3] - box[1]  # square: A1111's expand_crop_region keeps it
    cut = resize_image(init.crop(box), 64, 64, "resize and fill")
    cut_mask = resize_image(blurred.crop(box), 64, 64, "resize and fill")
    canvas = Image.new("RGBA", init.size)
    canvas.paste(resize_image(pipeline(cut, cut_mask), box[2] - box[0], box[3] - box[1], "crop and resize"), box[:2])
    np.testing.assert_array_equal(arr(r.image), arr(overlay(canvas, init, blurred)))
    # an empty mask with a latent masked content: as A1111, img2img of the whole image (no latent mask to fill by;
    # once the pipeline's "masked_content needs a mask", a failed job)
    r = api.img2img(images=[init], mask_image=Image.new("L", (64, 64), 0), prompt=PROMPT, seed=3,
                    denoising_strength=0.8, inpainting_fill=2, inpaint_full_res=True, **COMMON)  # fmt: skip
    plain = shared_loader("emoji", "cpu")(PROMPT, seed=3, init_image=init, strength=0.8, strength_rule="a1111",
                                          sampler="dpmpp_2m", schedule="karras", progress=False, **COMMON)  # fmt: skip
    np.testing.assert_array_equal(arr(r.image), arr(plain.images[0]))
    assert any("the mask is empty" in n for n in r.info["notes"])


def test_bad_blurs_are_one_line_400s(api) -> None:
    init = webuiapi.raw_b64_img(init_image())
    body = {"init_images": [init], "mask": webuiapi.raw_b64_img(grey_mask()), "prompt": "a", **COMMON}
    for field, value in (("mask_blur_x", -1), ("mask_blur_y", "x"), ("mask_blur_y", 1e9)):
        r = httpx.post(f"{api.baseurl}/img2img", json={**body, field: value}, timeout=60)
        assert r.status_code == 400 and f"{field} must be a number in [0, 256]" in r.text, r.text
