"""The real ``webuiapi`` client against a live ``sdengine serve`` (emoji model, 64x64): the images equal the
same request through the Python API."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from _a1111_masks import doubled
from _a1111_masks import fill as a1111_fill
from _a1111_masks import mask_blur as a1111_blur
from _a1111_masks import overlay as a1111_overlay
from _emoji_models import make_tiny_emoji_folder
from _live_server import live_server, server_config, shared_loader
from sdengine.pipeline import ControlUnit
from sdengine.server.catalog import BUILTIN_CONTROLNETS

COMMON = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
STYLES_CSV = (
    'name,prompt,negative_prompt\nFilm,"film still of {prompt}, grain",blurry\n# not a style,x,y\nSharp, sharp focus,\n'
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("a1111")
    make_tiny_emoji_folder(tmp / "models" / "tiny")
    styles = tmp / "styles.csv"  # A1111's format, with its BOM, a comment row and an old-style row
    styles.write_text(STYLES_CSV, encoding="utf-8-sig")
    with live_server(server_config(tmp, models_dir=tmp / "models", styles_file=styles)) as s:
        yield s


@pytest.fixture()
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", scheduler="Karras")


def emoji():
    return shared_loader("emoji", "cpu")


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def python_img2img(prompt: str, init: Image.Image, **extra):
    """The Python API's img2img (seed 3, strength 0.5) with the settings the A1111 client sends (and A1111's step
    count, the route's)."""
    return emoji()(
        prompt,
        seed=3,
        init_image=init,
        strength=0.5,
        strength_rule="a1111",
        sampler="dpmpp_2m",
        schedule="karras",
        progress=False,
        **COMMON,
        **extra,
    )


def gradient() -> Image.Image:
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(
        np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)], -1)
    )


def test_txt2img_equals_python_api_and_info_is_a1111s(api):
    r = api.txt2img(prompt="a red apple", seed=5, n_iter=2, **COMMON)
    # n_iter=2 is two calls of batch_size 1 (seeds 5 and 6), as A1111 runs it
    refs = [
        emoji()("a red apple", seed=s, sampler="dpmpp_2m", schedule="karras", progress=False, **COMMON) for s in (5, 6)
    ]
    assert len(r.images) == 2
    for got, want in zip(r.images, refs, strict=True):
        np.testing.assert_array_equal(arr(got), arr(want.images[0]))
    assert r.info["all_seeds"] == [5, 6] and r.info["seed"] == 5
    ref = refs[0]
    assert r.info["infotexts"] == [x.infotexts[0] for x in refs] and r.images[0].info["parameters"] == ref.infotexts[0]
    assert r.info["ignored"] == [] and r.parameters["prompt"] == "a red apple"
    assert r.info["sampler_name"] == "DPM++ 2M" and r.info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert api.png_info(r.images[0]).info == ref.infotexts[0]


def test_img2img_and_inpainting_equal_python_api(api):
    init = gradient()
    r = api.img2img(images=[init], prompt="a blue ball", seed=3, denoising_strength=0.5, **COMMON)
    np.testing.assert_array_equal(arr(r.image), arr(python_img2img("a blue ball", init).images[0]))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 56))
    for invert in (0, 1):
        r = api.img2img(
            images=[init],
            mask_image=mask,
            prompt="a blue ball",
            seed=3,
            denoising_strength=0.8,
            mask_blur=2,
            inpainting_fill=1,
            inpainting_mask_invert=invert,
            inpaint_full_res=False,  # "whole picture" (webuiapi's default is "only masked")
            **COMMON,
        )
        m = ImageOps.invert(mask) if invert else mask
        ref = emoji()(
            "a blue ball",
            seed=3,
            init_image=init,
            mask=m,
            mask_blur=2,
            strength=0.8,
            strength_rule="a1111",
            sampler="dpmpp_2m",
            schedule="karras",
            progress=False,
            **COMMON,
        )
        # A1111 pastes the init image back by its mask_for_overlay: the mask blurred (its Gaussian), doubled, by
        # its premultiplied alpha composite (tests/_a1111_masks.py)
        soft = doubled(a1111_blur(m, 2, 2))
        want = a1111_overlay(ref.images[0], init, soft)
        np.testing.assert_array_equal(arr(r.image), arr(want))
        outside = np.asarray(soft) == 0
        np.testing.assert_array_equal(arr(r.image)[outside], arr(init.convert("RGB"))[outside])
        assert outside.any() and "inpainting_fill" not in r.info["ignored"]
        assert ", Mask blur: 2" in r.info["infotexts"][0]
    # A1111's separate blurs: different ones run as A1111 runs them (once refused), across then down
    body = {"init_images": [webuiapi.raw_b64_img(init)], "mask": webuiapi.raw_b64_img(mask), "prompt": "a blue ball"}
    body.update(seed=3, denoising_strength=0.8, inpainting_fill=1, inpaint_full_res=False, **COMMON)
    body.update(sampler_name="DPM++ 2M", scheduler="Karras")
    got = httpx.post(f"{api.baseurl}/img2img", json={**body, "mask_blur_x": 16, "mask_blur_y": 0}, timeout=120)
    assert got.status_code == 200, got.text
    image = Image.open(io.BytesIO(base64.b64decode(got.json()["images"][0])))
    m = a1111_blur(mask, 16, 0)
    ref = emoji()("a blue ball", seed=3, init_image=init, mask=m, strength=0.8, strength_rule="a1111",
                  sampler="dpmpp_2m", schedule="karras", progress=False, **COMMON)  # fmt: skip
    np.testing.assert_array_equal(arr(image), arr(a1111_overlay(ref.images[0], init, doubled(m))))
    # an RGBA mask whose alpha marks the area (A1111 reads the alpha): the same image as the grey mask
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (8, 8, 40, 56))
    args = {"images": [init], "prompt": "a blue ball", "seed": 3, "denoising_strength": 0.8, "mask_blur": 2, **COMMON}
    grey = api.img2img(mask_image=mask, **args)
    alpha = api.img2img(mask_image=rgba, **args)
    np.testing.assert_array_equal(arr(alpha.image), arr(grey.image))
    assert alpha.info["ignored"].count("inpainting_fill") <= 1  # listed once at most


def test_latent_masked_content_and_full_strength_inpainting_as_a1111(api):
    """inpainting_fill 2 ("latent noise") and 3 ("latent nothing") fill the masked init latent as A1111 does (they
    were only listed as ignored), and at denoising strength 1 sampling starts from that latent noised (it was
    pure noise, diffusers' way); the infotext says A1111's "Masked content"."""
    init = gradient()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 56))
    for fill, content in ((2, "latent noise"), (3, "latent nothing"), (1, "original")):
        r = api.img2img(
            images=[init],
            mask_image=mask,
            prompt="a blue ball",
            seed=3,
            denoising_strength=1.0,
            mask_blur=0,
            inpainting_fill=fill,
            inpaint_full_res=False,
            **COMMON,
        )
        ref = emoji()(
            "a blue ball",
            seed=3,
            init_image=init if fill == 1 else a1111_fill(init, mask),  # A1111 fills the image for 2 and 3 too
            mask=mask,
            strength=1.0,
            strength_rule="a1111",
            masked_content=content,
            sampler="dpmpp_2m",
            schedule="karras",
            progress=False,
            **COMMON,
        )
        want = Image.composite(ref.images[0], init.convert("RGB"), mask)
        np.testing.assert_array_equal(arr(r.image), arr(want))
        assert "inpainting_fill" not in r.info["ignored"]
        assert (f"Masked content: {content}" in r.info["infotexts"][0]) == (fill != 1)


def test_img2img_noise_multiplier_as_a1111(api):
    """initial_noise_multiplier (a request field, or an infotext's "Noise multiplier") scales the noise the init
    image is noised with, as A1111."""
    init = gradient()
    want = python_img2img("a ball", init, noise_multiplier=0.8)
    r = api.img2img(
        images=[init], prompt="a ball", seed=3, denoising_strength=0.5, initial_noise_multiplier=0.8, **COMMON
    )
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert "initial_noise_multiplier" not in r.info["ignored"] and "Noise multiplier: 0.8" in r.info["infotexts"][0]
    body = {"init_images": [webuiapi.raw_b64_img(init)], "prompt": "a ball", "seed": 3, **COMMON}
    text = want.infotexts[0]
    from_text = {"init_images": body["init_images"], "infotext": text}  # the rest from the infotext
    r = httpx.post(f"{api.baseurl}/img2img", json=from_text, timeout=120)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    np.testing.assert_array_equal(arr(got), arr(want.images[0]))
    bad = httpx.post(f"{api.baseurl}/img2img", json={**body, "initial_noise_multiplier": "x"}, timeout=120)
    assert bad.status_code in (400, 422), bad.text


def test_controlnet_unit_and_empty_args(api):
    from sdengine.control import canny

    control = canny(gradient().convert("RGB"))
    assert "emoji-controlnet-canny" in api.controlnet_model_list() and "canny" in api.controlnet_module_list()
    unit = webuiapi.ControlNetUnit(
        image=control,
        module="none",
        model="emoji-controlnet-canny",
        weight=0.8,
        resize_mode="Just Resize",
        guidance_end=0.7,
    )
    # alwayson_scripts={} given: webuiapi adds the units to its mutable default dict otherwise (its bug)
    r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **COMMON)
    path = BUILTIN_CONTROLNETS["emoji-controlnet-canny"]

    def reference(rule: str):
        unit = ControlUnit(path, control, 0.8, 0.0, 0.7, rule=rule)
        kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **COMMON}
        return emoji()("a star", seed=9, controlnets=[unit], **kw)

    # the extension's step rule (step i when start <= i/steps <= end): end 0.7 of 3 steps controls all three,
    # where diffusers' rule ((i+1)/steps <= end) leaves the last one out
    ref = reference("a1111")
    np.testing.assert_array_equal(arr(r.image), arr(ref.images[0]))
    assert np.abs(arr(r.image).astype(int) - arr(reference("diffusers").images[0]).astype(int)).max() > 0
    assert "ControlNet step rule: a1111" in r.info["infotexts"][0]
    plain = api.txt2img(prompt="a star", seed=9, alwayson_scripts={"ControlNet": {"args": []}}, **COMMON)
    ref = emoji()("a star", seed=9, sampler="dpmpp_2m", schedule="karras", progress=False, **COMMON)
    np.testing.assert_array_equal(arr(plain.image), arr(ref.images[0]))
    # never silently without the ControlNet: a misspelt key is listed, a unit config that is no object refused
    r = api.txt2img(prompt="a star", seed=9, alwayson_scripts={"controlnet": {"arg": []}}, **COMMON)
    assert "alwayson_scripts.controlnet.arg" in r.info["ignored"]
    bad = httpx.post(
        f"{api.baseurl}/txt2img", json={"prompt": "a", "alwayson_scripts": {"controlnet": "x"}}, timeout=60
    )
    assert bad.status_code == 400 and "alwayson_scripts.controlnet must be an object" in bad.text, bad.text


def test_unknown_and_unimplemented_fields_are_reported(api):
    r = api.txt2img(prompt="a cat", seed=1, override_settings={"samples_format": "jpg"}, **COMMON)
    assert r.info["ignored"] == ["override_settings.samples_format"]  # does not change the image
    # an option that would (a VAE the server does not have) is a 400 naming it (it was listed as ignored: the
    # image of the model's own VAE)
    with pytest.raises(RuntimeError, match="400.*override_settings.sd_vae: unknown VAE"):
        api.txt2img(prompt="a cat", seed=1, override_settings={"sd_vae": "x"}, **COMMON)
    # a field that would change the image but is not implemented is a 422 naming it (it was listed as ignored)
    with pytest.raises(RuntimeError, match="422.*restore_faces True: face restoration"):
        api.txt2img(prompt="a cat", seed=1, restore_faces=True, **COMMON)
    r = api.custom_post("txt2img", {"prompt": "a cat", "seed": 1, "frobnicate": 3, **COMMON}, baseurl=True)
    assert r.info["ignored"] == ["frobnicate"]


def test_taesd_decode_method_as_an_option_and_an_override(api):
    want = emoji()(
        "a red apple", seed=5, sampler="dpmpp_2m", schedule="karras", progress=False, vae_decode="tiny", **COMMON
    )
    r = api.txt2img(prompt="a red apple", seed=5, override_settings={"sd_vae_decode_method": "TAESD"}, **COMMON)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert "Tiny VAE: vae_tiny" in r.info["infotexts"][0] and "override_settings" not in str(r.info.get("ignored"))
    try:
        assert api.set_options({"sd_vae_decode_method": "TAESD"})["applied"] == ["sd_vae_decode_method"]
        assert api.get_options()["sd_vae_decode_method"] == "TAESD"
        r = api.txt2img(prompt="a red apple", seed=5, **COMMON)
        np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    finally:
        api.set_options({"sd_vae_decode_method": "Full"})
    bad = httpx.post(f"{api.baseurl}/options", json={"sd_vae_decode_method": "Approx NN"}, timeout=30)
    assert bad.status_code == 400 and "sd_vae_decode_method must be one of Full, TAESD" in bad.text


def test_a_refused_options_request_changes_nothing(api):
    before = api.get_options()
    for body in (
        {"CLIP_stop_at_last_layers": 3, "sd_model_checkpoint": "nope"},
        {"sd_vae_decode_method": "TAESD", "CLIP_stop_at_last_layers": 99},
    ):
        bad = httpx.post(f"{api.baseurl}/options", json=body, timeout=30)
        assert bad.status_code == 400, bad.text
    assert api.get_options() == before


def test_a_global_clip_skip_option_applies_only_where_a1111_applies_it(api):
    """A1111's Clip skip (CLIP_stop_at_last_layers) reaches SD 1.x's CLIP only: set as a global option it once
    failed every job of the MiniLM emoji model (and stayed set); now such a model runs as at clip skip 1, and
    the infotext keeps the setting as A1111 writes it."""
    plain = emoji()("a red apple", seed=5, sampler="dpmpp_2m", schedule="karras", progress=False, **COMMON)
    try:
        assert api.set_options({"CLIP_stop_at_last_layers": 2})["applied"] == ["CLIP_stop_at_last_layers"]
        r = api.txt2img(prompt="a red apple", seed=5, **COMMON)
        np.testing.assert_array_equal(arr(r.image), arr(plain.images[0]))
        assert "Clip skip: 2, Clip skip rule: a1111" in r.info["infotexts"][0]
        init = gradient()
        r = api.img2img(images=[init], prompt="a ball", seed=3, denoising_strength=0.5, **COMMON)
        np.testing.assert_array_equal(arr(r.image), arr(python_img2img("a ball", init).images[0]))
        # A1111's "Clip skip SDXL" (its skip for SDXL's CLIP-L): an option here too, no SDXL meaning elsewhere
        assert api.set_options({"sdxl_clip_l_skip": True})["applied"] == ["sdxl_clip_l_skip"]
        assert api.get_options()["sdxl_clip_l_skip"] is True
        r = api.txt2img(prompt="a red apple", seed=5, **COMMON)
        np.testing.assert_array_equal(arr(r.image), arr(plain.images[0]))
        assert "Clip skip rule: a1111_sdxl_clip_l" in r.info["infotexts"][0]
        bad = httpx.post(f"{api.baseurl}/options", json={"sdxl_clip_l_skip": "yes"}, timeout=30)
        assert bad.status_code == 400 and "sdxl_clip_l_skip must be true or false" in bad.text
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1, "sdxl_clip_l_skip": False})


def test_ddim_and_plms_walk_a1111s_grid_on_the_a1111_routes(api):
    """A1111's DDIM and PLMS make their own grid (20 steps: 19 calls ending at t = 1; img2img noised one point
    higher than it starts); the routes ran diffusers' grid. Now the image is the Python API's under
    strength_rule "a1111", which the infotext records."""
    for sampler, name in (("ddim", "DDIM"), ("plms", "PLMS")):
        kw = dict(seed=5, sampler=sampler, schedule="normal", progress=False, **COMMON)
        if sampler == "ddim":  # webuiapi sends eta 1, which A1111's DDIM takes
            kw["sampler_options"] = {"eta": 1.0}
        want = emoji()("a red apple", strength_rule="a1111", **kw)
        r = api.txt2img(prompt="a red apple", seed=5, sampler_name=name, scheduler="Automatic", **COMMON)
        np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
        assert r.info["infotexts"][0] == want.infotexts[0] and "Strength rule: a1111" in want.infotexts[0]
        assert not np.array_equal(arr(r.image), arr(emoji()("a red apple", **kw).images[0]))
    init = gradient()
    body = {**COMMON, "steps": 6}
    want = emoji()(
        "a ball",
        seed=3,
        init_image=init,
        strength=0.5,
        strength_rule="a1111",
        sampler="ddim",
        schedule="normal",
        sampler_options={"eta": 0.0},
        progress=False,
        **body,
    )
    r = api.img2img(
        images=[init], prompt="a ball", seed=3, denoising_strength=0.5, sampler_name="DDIM", eta=0.0, **body
    )
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))


def test_img2img_fix_steps_option_and_override(api):
    """A1111's img2img_fix_steps ("With img2img, do exactly the amount of steps the slider specifies"; once listed
    as ignored): as an override or an option, img2img runs the steps asked (the pipeline's strength_rule
    "a1111_fix_steps", recorded in the infotext as sdengine's Strength rule, and read back from it)."""
    init = gradient()
    want = emoji()(
        "a ball",
        seed=3,
        init_image=init,
        strength=0.5,
        strength_rule="a1111_fix_steps",
        sampler="dpmpp_2m",
        schedule="karras",
        progress=False,
        **COMMON,
    )
    kw = dict(images=[init], prompt="a ball", seed=3, denoising_strength=0.5, **COMMON)
    r = api.img2img(**kw, override_settings={"img2img_fix_steps": True})
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == [] and "Strength rule: a1111_fix_steps" in r.info["infotexts"][0]
    assert r.info["infotexts"][0] == want.infotexts[0]
    plain = api.img2img(**kw)
    assert not np.array_equal(arr(plain.image), arr(r.image))
    again = api.custom_post(
        "img2img", {"init_images": [webuiapi.raw_b64_img(init)], "infotext": want.infotexts[0]}, baseurl=True
    )
    np.testing.assert_array_equal(arr(again.image), arr(want.images[0]))
    try:
        assert api.set_options({"img2img_fix_steps": True})["applied"] == ["img2img_fix_steps"]
        np.testing.assert_array_equal(arr(api.img2img(**kw).image), arr(want.images[0]))
        bad = httpx.post(f"{api.baseurl}/options", json={"img2img_fix_steps": "yes"}, timeout=30)
        assert bad.status_code == 400 and "img2img_fix_steps must be true or false" in bad.text
    finally:
        api.set_options({"img2img_fix_steps": False})


def test_taesd_encode_method_is_read_and_needs_an_encoder(api):
    init = gradient()
    want = python_img2img("a ball", init, vae_encode="tiny")
    try:
        assert api.set_options({"sd_vae_encode_method": "TAESD"})["applied"] == ["sd_vae_encode_method"]
        assert api.get_options()["sd_vae_encode_method"] == "TAESD"
        r = api.img2img(images=[init], prompt="a ball", seed=3, denoising_strength=0.5, **COMMON)
        np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
        assert "Tiny VAE encode: vae_tiny" in r.info["infotexts"][0]
        r = api.txt2img(prompt="a red apple", seed=5, **COMMON)  # nothing to encode: as with "Full"
        plain = emoji()("a red apple", seed=5, sampler="dpmpp_2m", schedule="karras", progress=False, **COMMON)
        np.testing.assert_array_equal(arr(r.image), arr(plain.images[0]))
        # the "tiny" model of this server has no tiny VAE: one line says so
        body = {"prompt": "a ball", "seed": 3, "init_images": [webuiapi.raw_b64_img(init)], "denoising_strength": 0.5}
        body["override_settings"] = {"sd_model_checkpoint": "tiny"}
        bad = httpx.post(f"{api.baseurl}/img2img", json={**body, **COMMON}, timeout=120)
        assert bad.status_code >= 400 and "needs a tiny VAE with an encoder and tiny has none" in bad.text, bad.text
    finally:
        api.set_options({"sd_vae_encode_method": "Full"})
    bad = httpx.post(f"{api.baseurl}/options", json={"sd_vae_encode_method": "Approx NN"}, timeout=30)
    assert bad.status_code == 400 and "sd_vae_encode_method must be one of Full, TAESD" in bad.text


def test_progress_and_interrupt(api):
    out: dict = {}
    body = {"prompt": "a tree", "seed": 2, "force_task_id": "task-7", **COMMON, "steps": 150}
    t = threading.Thread(target=lambda: out.update(r=api.custom_post("txt2img", body, baseurl=True)))
    t.start()
    deadline = time.monotonic() + 120
    while True:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2:
            break
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.05)
    assert 0 < p["progress"] < 1 and p["state"]["job_count"] >= 1 and p["state"]["sampling_steps"] == 150
    ip = api.session.post(
        f"{api.baseurl.removesuffix('/sdapi/v1')}/internal/progress",
        json={"id_task": "task-7", "id_live_preview": -1, "live_preview": True},
    ).json()
    assert ip["active"] and not ip["completed"] and 0 < ip["progress"] < 1
    assert ip["live_preview"] is None or ip["live_preview"].startswith("data:image/png;base64,")
    t0 = time.monotonic()
    assert api.interrupt()["interrupted"]
    t.join(60)
    assert not t.is_alive() and time.monotonic() - t0 < 30
    assert out["r"].info["interrupted"] is True and out["r"].image.size == (64, 64)
    texts = out["r"].info["infotexts"]  # one per image, the interrupted one's too (clients index them)
    assert len(texts) == len(out["r"].images) and "Seed: 2" in texts[0] and "Steps: 150" in texts[0]
    assert api.get_progress()["state"]["job_count"] == 0
    assert len(api.txt2img(prompt="a tree", seed=2, **COMMON).images) == 1  # the next job runs


def test_model_names_and_set_model(api):
    assert api.util_get_model_names() == ["emoji", "tiny"]
    api.util_set_model("tiny")
    try:
        assert api.util_get_current_model() == "tiny"
        r = api.txt2img(prompt="a cat", seed=1, steps=2, width=16, height=16)
        assert r.info["sd_model_name"] == "tiny" and r.image.size == (16, 16)
    finally:
        api.util_set_model("emoji")
    assert api.util_get_current_model() == "emoji"
    for name in (
        "samplers",
        "schedulers",
        "loras",
        "sd-vae",
        "upscalers",
        "embeddings",
        "scripts",
        "cmd-flags",
        "memory",
        "options",
        "sd-models",
    ):
        assert api.session.get(f"{api.baseurl}/{name}").status_code == 200, name
    assert "DPM++ 2M" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()


def test_skip_with_a_json_body_moves_to_the_next_batch(api):
    out: dict = {}
    body = {
        "prompt": "a cloud",
        "seed": 40,
        "n_iter": 2,
        "force_task_id": "task-skip",
        "steps": 40,
        "width": 16,
        "height": 16,
        "cfg_scale": 7.0,
    }
    t = threading.Thread(target=lambda: out.update(r=api.custom_post("txt2img", body, baseurl=True)))
    t.start()
    deadline = time.monotonic() + 120
    while api.get_progress()["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.05)
    r = api.session.post(f"{api.baseurl}/skip", json={"id_task": "task-skip"})
    assert r.json() == {"skipped": ["task-skip"]}
    t.join(120)
    assert not t.is_alive()
    assert out["r"].info["all_seeds"] == [41] and len(out["r"].images) == 1  # the first batch (seed 40) skipped


def a1111_img2img_steps(api, strength: float, steps: int, runs: int) -> None:
    """The route's img2img at ``strength`` and ``steps`` (32x32) is the Python API's with strength_rule="a1111",
    which runs ``runs`` steps; the infotext records the strength as asked."""
    init = gradient().resize((32, 32))
    common = {**COMMON, "steps": steps, "width": 32, "height": 32}
    seen: list[int] = []
    ref = emoji()(
        "a blue ball",
        seed=3,
        init_image=init,
        strength=strength,
        strength_rule="a1111",
        sampler="dpmpp_2m",
        schedule="karras",
        progress=False,
        callback=lambda info: seen.append(info.steps),
        **common,
    )
    assert seen == [runs] * runs
    r = api.img2img(images=[init], prompt="a blue ball", seed=3, denoising_strength=strength, **common)
    np.testing.assert_array_equal(arr(r.image), arr(ref.images[0]))
    assert r.info["infotexts"] == ref.infotexts and r.info["denoising_strength"] == strength
    text = r.info["infotexts"][0]
    assert f"Denoising strength: {strength:g}" in text and "Strength rule: a1111" in text
    assert not any("step" in n for n in r.info["notes"]), r.info["notes"]  # no more stop-gap note


def test_img2img_counts_steps_as_a1111(api):
    """A1111 runs int(min(strength, 0.999) * steps) + 1 img2img steps from sigmas[steps - t_enc - 1:]
    (sd_samplers_kdiffusion.py sample_img2img): 20 steps at 0.75 is 16 steps (diffusers' rule: 15)."""
    a1111_img2img_steps(api, 0.75, 20, 16)


def test_img2img_with_a_strength_under_one_step_runs_one_step_as_a1111(api):
    """Where int(steps * strength) is 0 (strength 0 too), A1111's rule still runs one step (once a 400, then the
    strength 1 / steps in the infotext): the strength as asked, with A1111's step count."""
    for strength in (0.1, 0.0):
        a1111_img2img_steps(api, strength, 3, 1)


def test_include_init_images_keeps_them_in_the_parameters(api):
    """A1111 answers the init images and the mask in ``parameters`` only with include_init_images, else null."""
    init, mask = webuiapi.raw_b64_img(gradient()), webuiapi.raw_b64_img(Image.new("L", (64, 64), 255))
    body = {"init_images": [init], "mask": mask, "prompt": "a", "seed": 1, "denoising_strength": 0.5, **COMMON}
    kept = api.custom_post("img2img", {**body, "include_init_images": True}, baseurl=True)
    assert kept.parameters["init_images"] == [init] and kept.parameters["mask"] == mask
    assert kept.parameters["include_init_images"] is True and "include_init_images" not in kept.info["ignored"]
    dropped = api.custom_post("img2img", body, baseurl=True)
    assert dropped.parameters["init_images"] is None and dropped.parameters["mask"] is None
    np.testing.assert_array_equal(arr(kept.image), arr(dropped.image))


def test_extra_single_image_upscales_as_a1111s_lanczos(api):
    """A1111's extras with its Lanczos upscaler: resized by the scale, then to the size rounded down to 8;
    to a size: the scale that covers it, then the centre cut (on black where the rounding fell short)."""
    g = gradient()
    r = api.extra_single_image(image=g, upscaler_1="Lanczos", upscaling_resize=2)
    np.testing.assert_array_equal(arr(r.image), arr(g.resize((128, 128), Image.Resampling.LANCZOS)))
    assert "Postprocess upscaler: Lanczos" in r.info
    small = g.resize((60, 60))
    r = api.extra_single_image(image=small, upscaler_1="Lanczos", upscaling_resize=1.5)  # 90, then 88
    want = small.resize((90, 90), Image.Resampling.LANCZOS).resize((88, 88), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(arr(r.image), arr(want))
    to = {"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 50}
    r = api.extra_single_image(image=g, upscaler_1="Lanczos", **to)
    cut = Image.new("RGB", (100, 50))  # scale 100/64 -> 100 -> 96 (rounded to 8), pasted centred
    cut.paste(g.resize((100, 100), Image.Resampling.LANCZOS).resize((96, 96), Image.Resampling.LANCZOS), (2, -23))
    np.testing.assert_array_equal(arr(r.image), arr(cut))
    np.testing.assert_array_equal(arr(api.extra_single_image(image=g, upscaler_1="None").image), arr(g))
    for bad, msg in (
        ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1 'R-ESRGAN 4x+' is not available"),
        ({"upscaler_1": "Lanczos", "codeformer_visibility": 0.5}, "face restoration is not available"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 0}, "upscaling_resize must be > 0"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 70}, "is over the limit of 8192 pixels a side and 16777216"),
    ):
        r = httpx.post(f"{api.baseurl}/extra-single-image", json={"image": webuiapi.raw_b64_img(g), **bad}, timeout=30)
        assert r.status_code == 400 and msg in r.text, r.text
    # the lists a client fills its hires upscaler choice from: what the hires fix takes
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos"]
    modes = [m["name"] for m in api.get_latent_upscale_modes()]
    assert modes[0] == "Latent" and "Latent (bicubic antialiased)" in modes and len(modes) == 6


def test_variation_seeds_as_a1111(api):
    """subseed / subseed_strength (once listed as ignored): A1111 gives every image the one seed and image k
    the variation seed subseed + k, over batch_size x n_iter."""
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **COMMON}
    r = api.txt2img(prompt="a cat", seed=7, subseed=100, subseed_strength=0.4, batch_size=2, n_iter=2, **COMMON)
    assert r.info["all_seeds"] == [7] * 4 and r.info["all_subseeds"] == [100, 101, 102, 103]
    assert r.info["subseed_strength"] == 0.4 and r.info["ignored"] == []
    for it in range(2):  # each n_iter batch is the Python API's batch of seeds [7, 7] from subseed 100 + 2 * it
        want = emoji()(["a cat"] * 2, seed=[7, 7], subseed=100 + 2 * it, subseed_strength=0.4, **kw)
        for k in range(2):
            np.testing.assert_array_equal(arr(r.images[2 * it + k]), arr(want.images[k]))
            assert r.info["infotexts"][2 * it + k] == want.infotexts[k]
            assert "Seed: 7, " in want.infotexts[k] and f"Variation seed: {100 + 2 * it + k}" in want.infotexts[k]
    bad = httpx.post(
        f"{api.baseurl}/txt2img", json={"prompt": "a", "subseed_strength": 2, "subseed": 1, **COMMON}, timeout=30
    )
    assert bad.status_code == 400 and "subseed_strength" in bad.text, bad.text


def test_resize_modes_of_init_mask_and_control_images(api):
    """img2img's resize_mode (once listed as ignored) fits the init image (and the mask, and the image pasted
    back) as A1111; a ControlNet unit without one has the extension's default, Crop and Resize."""
    from sdengine.control import canny
    from sdengine.io.resize import resize_image

    init = gradient().resize((64, 32))
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **COMMON}
    for mode in (1, 2):
        r = api.img2img(images=[init], prompt="a ball", seed=3, denoising_strength=0.6, resize_mode=mode, **COMMON)
        want = emoji()("a ball", seed=3, init_image=init, strength=0.6, resize_mode=mode, **kw)
        np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
        assert r.info["ignored"] == []
    # 3, A1111's latent upscale (once listed as ignored): the init image's latent resized, the pipeline's
    r = api.img2img(images=[init], prompt="a ball", seed=3, denoising_strength=0.6, resize_mode=3, **COMMON)
    want = emoji()("a ball", seed=3, init_image=init, strength=0.6, init_latent_resize=True, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == []
    # inpainting, crop and resize: the mask is cut as the image, and the init pasted back is the cut one
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (16, 0, 48, 32))
    r = api.img2img(
        images=[init],
        mask_image=mask,
        prompt="a ball",
        seed=3,
        denoising_strength=0.8,
        resize_mode=1,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=False,
        **COMMON,
    )
    fitted_mask, fitted = resize_image(mask, 64, 64, "crop and resize"), resize_image(init, 64, 64, "crop and resize")
    ref = emoji()("a ball", seed=3, init_image=init, mask=fitted_mask, strength=0.8, resize_mode=1, **kw)
    doubled = fitted_mask.point(lambda v: min(255, 2 * v))  # A1111's mask_for_overlay
    want = Image.composite(ref.images[0], fitted.convert("RGB"), doubled)
    np.testing.assert_array_equal(arr(r.image), arr(want))
    # ControlNet: a control image of another aspect, the unit's mode unset -> Crop and Resize
    control = canny(gradient().resize((64, 32)).convert("RGB"))
    unit = {"image": webuiapi.raw_b64_img(control), "model": "emoji-controlnet-canny", "module": "none"}
    body = {"prompt": "a star", "seed": 9, "sampler_name": "DPM++ 2M", "scheduler": "Karras", **COMMON}
    body["alwayson_scripts"] = {"controlnet": {"args": [unit]}}
    r = api.custom_post("txt2img", body, baseurl=True)
    path = BUILTIN_CONTROLNETS["emoji-controlnet-canny"]
    want = emoji()("a star", seed=9, controlnets=[(path, control, 1.0)], resize_mode=1, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    # two units of different modes: sdengine fits all in one, the other is said
    units = [unit, {**unit, "resize_mode": "Resize and Fill"}]
    body["alwayson_scripts"] = {"controlnet": {"args": units}}
    r = api.custom_post("txt2img", body, baseurl=True)
    assert r.info["ignored"] == ["controlnet.args[1].resize_mode"]


def test_skipping_the_only_batch_answers_its_image_so_far(api):
    """A1111's skip of a one-batch call answers the image as far as it got (its sampler returns the last
    latent); sdengine's answer once had no image at all (webuiapi's ``r.image`` raised IndexError)."""
    out: dict = {}
    body = {"prompt": "a cloud", "seed": 40, "force_task_id": "task-skip1", **COMMON, "steps": 150}
    t = threading.Thread(target=lambda: out.update(r=api.custom_post("txt2img", body, baseurl=True)))
    t.start()
    deadline = time.monotonic() + 120
    while api.get_progress()["state"]["sampling_step"] < 3:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.05)
    assert api.session.post(f"{api.baseurl}/skip", json={"id_task": "task-skip1"}).json() == {"skipped": ["task-skip1"]}
    t.join(120)
    assert not t.is_alive()
    r = out["r"]
    assert r.image.size == (64, 64) and len(r.images) == 1 and len(r.info["infotexts"]) == 1
    assert r.info["interrupted"] is False and any(n.startswith("skipped at step") for n in r.info["notes"])


def test_disable_extra_networks_takes_the_tags_out_and_applies_none(api):
    """A1111's disable_extra_networks (once listed as ignored while the LoRA was applied): the <lora:...> tags
    are taken out of the prompt and no LoRA is applied."""
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **COMMON}
    body = {"prompt": "a cat <lora:emoji-fruit:1>", "seed": 1, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
    r = api.custom_post("txt2img", {**body, **COMMON, "disable_extra_networks": True}, baseurl=True)
    want = emoji()("a cat ", seed=1, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == [] and "Lora hashes" not in r.info["infotexts"][0]
    with_lora = api.txt2img(prompt="a cat <lora:emoji-fruit:1>", seed=1, **COMMON)
    assert "Lora hashes" in with_lora.info["infotexts"][0] and not np.array_equal(arr(with_lora.image), arr(r.image))


def test_png_info_answers_a1111s_fields_and_reads_jpeg_exif(api):
    """A1111's png-info: ``parameters`` as its parse_generation_parameters gives them (``Size-1``/``Size-2``,
    the ``Clip skip`` default), ``items`` without the parameters text; a JPEG's EXIF UserComment is read (once:
    an empty answer)."""
    from sdengine.image_info import EXIF_IFD, USER_COMMENT, encode_user_comment

    text = "a cat\nNegative prompt: ugly\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x48, Hires resize: 128x96"
    png = gradient()
    info = PngInfo()
    info.add_text("parameters", text)
    info.add_text("other", "x")
    buf = io.BytesIO()
    png.save(buf, format="PNG", pnginfo=info)
    r = api.session.post(f"{api.baseurl}/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()
    assert r["info"] == text and r["items"] == {"other": "x"}
    p = r["parameters"]
    assert (p["Size-1"], p["Size-2"], p["Hires resize-1"], p["Hires resize-2"]) == ("64", "48", "128", "96")
    assert "Size" not in p and p["Clip skip"] == "1" and p["Steps"] == "3" and p["Negative prompt"] == "ugly"
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = encode_user_comment(text)
    buf = io.BytesIO()
    png.save(buf, format="JPEG", exif=exif)
    r = api.session.post(f"{api.baseurl}/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()
    assert r["info"] == text and r["parameters"]["Seed"] == "1" and r["items"]["exif comment"] == text


def test_a_selectable_script_is_refused_as_a1111_refuses_one_it_lacks(api):
    """script_name (X/Y/Z plot, ...): A1111 answers 422 for a script it does not have, and sdengine has none;
    once the call ran without it (a plain image instead of the plot, the name only listed as ignored)."""
    for route, extra in (("txt2img", {}), ("img2img", {"init_images": [webuiapi.raw_b64_img(gradient())]})):
        body = {"prompt": "a", "script_name": "x/y/z plot", "script_args": [1], **COMMON, **extra}
        r = httpx.post(f"{api.baseurl}/{route}", json=body, timeout=60)
        assert r.status_code == 400 and "Script 'x/y/z plot' not found" in r.text, r.text
    r = api.txt2img(prompt="a", seed=1, script_name="", **COMMON)  # "" = no script
    assert r.info["ignored"] == []


def test_only_masked_inpainting_and_fill_as_a1111(api):
    """webuiapi's default inpainting is A1111's "Only masked" with masked content "fill" (inpaint_full_res,
    inpainting_fill 0); both were once only listed as ignored. Only masked: the box around the mask, grown to
    the output's aspect ratio, is cut, inpainted at the full size, and fitted back into the box."""
    from sdengine.server.a1111 import masked_fill

    init = gradient()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 56))
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **COMMON}
    args = {"images": [init], "mask_image": mask, "prompt": "a ball", "seed": 3, "denoising_strength": 0.8}
    r = api.img2img(**args, mask_blur=0, inpainting_fill=1, inpaint_full_res=True, **COMMON)
    # the mask's box (8, 8, 40, 56), 32x48, grown evenly to the 1:1 output: (0, 8, 48, 56)
    region = (0, 8, 48, 56)
    cut = init.crop(region).resize((64, 64), Image.Resampling.LANCZOS)
    cut_mask = mask.crop(region).resize((64, 64), Image.Resampling.LANCZOS)
    ref = emoji()("a ball", seed=3, init_image=cut, mask=cut_mask, strength=0.8, **kw)
    canvas = init.convert("RGB")
    canvas.paste(ref.images[0].resize((48, 48), Image.Resampling.LANCZOS), region[:2])
    want = Image.composite(canvas, init.convert("RGB"), mask)
    assert r.image.size == (64, 64) and r.info["ignored"] == []
    np.testing.assert_array_equal(arr(r.image), arr(want))
    # with padding 4: the box (4, 4, 44, 60) grows to 56 wide from x -4, shifted back inside: (0, 4, 56, 60)
    r = api.img2img(**args, mask_blur=0, inpainting_fill=1, inpaint_full_res=True, inpaint_full_res_padding=4, **COMMON)
    region = (0, 4, 56, 60)
    cut = init.crop(region).resize((64, 64), Image.Resampling.LANCZOS)
    cut_mask = mask.crop(region).resize((64, 64), Image.Resampling.LANCZOS)
    ref = emoji()("a ball", seed=3, init_image=cut, mask=cut_mask, strength=0.8, **kw)
    canvas = init.convert("RGB")
    canvas.paste(ref.images[0].resize((56, 56), Image.Resampling.LANCZOS), region[:2])
    np.testing.assert_array_equal(arr(r.image), arr(Image.composite(canvas, init.convert("RGB"), mask)))
    # "fill" (whole picture): the init image's masked area painted from around it before it is encoded
    r = api.img2img(**args, mask_blur=0, inpainting_fill=0, inpaint_full_res=False, **COMMON)
    filled = masked_fill(init.convert("RGB"), mask)
    inside, outside = np.asarray(mask) == 255, np.asarray(mask) == 0
    assert (arr(filled)[outside] == arr(init)[outside]).all() and (arr(filled)[inside] != arr(init)[inside]).any()
    ref = emoji()("a ball", seed=3, init_image=filled, mask=mask, strength=0.8, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(Image.composite(ref.images[0], init.convert("RGB"), mask)))
    assert r.info["ignored"] == []
    # an empty mask: as A1111, img2img of the whole image, said in the notes
    r = api.img2img(**{**args, "mask_image": Image.new("L", (64, 64), 0)}, inpaint_full_res=True, **COMMON)
    want = emoji()("a ball", seed=3, init_image=init, strength=0.8, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert any("the mask is empty" in n for n in r.info["notes"])
    body = {"init_images": [webuiapi.raw_b64_img(init)], "mask": webuiapi.raw_b64_img(mask), "prompt": "a", **COMMON}
    bad = httpx.post(f"{api.baseurl}/img2img", json={**body, "inpaint_full_res": True, "inpaint_full_res_padding": -3})
    assert bad.status_code == 400 and "inpaint_full_res_padding must be an integer in [0, 4096]" in bad.text


def test_extra_batch_images_and_interrogate(api):
    """webuiapi's extra_batch_images (once a bare 404): each image as extra-single-image makes it; interrogate,
    which sdengine cannot do, is a 404 that says so."""
    g, small = gradient(), gradient().resize((32, 32))
    r = api.extra_batch_images(images=[g, small], upscaler_1="Lanczos", upscaling_resize=2)
    assert [i.size for i in r.images] == [(128, 128), (64, 64)]
    np.testing.assert_array_equal(arr(r.images[1]), arr(small.resize((64, 64), Image.Resampling.LANCZOS)))
    bad = httpx.post(f"{api.baseurl}/extra-batch-images", json={"imageList": [], "upscaler_1": "Lanczos"}, timeout=30)
    assert bad.status_code == 400 and "imageList must hold 1 to 64 images" in bad.text
    r = httpx.post(f"{api.baseurl}/interrogate", json={"image": webuiapi.raw_b64_img(g), "model": "clip"}, timeout=30)
    assert r.status_code == 404 and "interrogate" in r.text and "not available" in r.text


def test_null_fields_are_the_defaults(api):
    """Clients made from A1111's OpenAPI document (every field optional) send null for the fields they leave out:
    the defaults (once a 422 for negative_prompt, alwayson_scripts, send_images, ...)."""
    body = {"prompt": "a cat", "seed": 4, "sampler_name": "DPM++ 2M", "scheduler": "Karras", **COMMON}
    nulls = dict.fromkeys(("negative_prompt", "alwayson_scripts", "send_images", "enable_hr", "hr_prompt", "styles"))
    plain = api.custom_post("txt2img", body, baseurl=True)
    r = api.custom_post("txt2img", {**body, **nulls}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(plain.image))
    assert r.info["ignored"] == [] and r.info["infotexts"] == plain.info["infotexts"]


def test_controlnet_processor_res_thresholds_and_unit_mask(api):
    """A preprocessed unit's image is scaled to its processor_res first (the extension's preprocessors take it
    so; once silently dropped: another control map); canny thresholds of -1 are the extension's 100 / 200; a
    unit's own mask is listed as ignored (once silently dropped)."""
    import cv2

    from sdengine.control import canny

    g = gradient().convert("RGB")
    path = BUILTIN_CONTROLNETS["emoji-controlnet-canny"]
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **COMMON}
    unit = webuiapi.ControlNetUnit(image=g, module="canny", model="emoji-controlnet-canny", processor_res=128)
    unit.threshold_a = unit.threshold_b = -1
    r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **COMMON)
    scaled = Image.fromarray(cv2.resize(np.asarray(g), (128, 128), interpolation=cv2.INTER_CUBIC))  # short side 128
    want = emoji()("a star", seed=9, controlnets=[(path, canny(scaled, 100, 200), 1.0)], resize_mode=2, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == []
    unit.mask = Image.new("L", (64, 64), 255)
    r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **COMMON)
    assert r.info["ignored"] == ["controlnet.args[0].mask"]
    unit.processor_res = 5000
    body = {"prompt": "a", "alwayson_scripts": {"controlnet": {"args": [unit.to_dict()]}}, **COMMON}
    bad = httpx.post(f"{api.baseurl}/txt2img", json=body, timeout=30)
    assert bad.status_code == 400 and "processor_res must be an integer in [64, 2048] or -1" in bad.text


@pytest.mark.slow  # six generations; the weights, rows and resolution are held fast in test_controlnet_modes.py
def test_controlnet_control_modes_and_pixel_perfect_as_the_extension(api):
    """A unit's control_mode 1 ("My prompt is more important": the soft weights) and 2 ("ControlNet is more
    important": those weights on the conditional half only) and pixel_perfect (processor_res from the image's size,
    the output's and the resize mode) run as the extension's (once only listed as ignored: another image)."""
    from sdengine.control import canny
    from sdengine.server.a1111 import processor_resize

    g = gradient().convert("RGB").resize((48, 32))
    path = BUILTIN_CONTROLNETS["emoji-controlnet-canny"]
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **COMMON}
    images = {}
    for number, mode in ((0, "balanced"), (1, "prompt"), (2, "controlnet")):
        unit = webuiapi.ControlNetUnit(image=g, model="emoji-controlnet-canny", control_mode=number)
        r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **COMMON)
        want = emoji()("a star", seed=9, controlnets=[ControlUnit(path, g, 1.0, mode=mode)], resize_mode=2, **kw)
        np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
        assert r.info["ignored"] == [] and (mode == "balanced") == ("Control Mode" not in r.info["infotexts"][0])
        images[mode] = arr(r.image).astype(int)
    assert len({v.tobytes() for v in images.values()}) == 3
    # pixel perfect, "Resize and Fill" (webuiapi's default): the short side 32 times min(64/32, 64/48): 43
    unit = webuiapi.ControlNetUnit(image=g, module="canny", model="emoji-controlnet-canny", pixel_perfect=True)
    unit.threshold_a, unit.threshold_b = 100, 200
    r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **COMMON)
    control = canny(processor_resize(g, 43), 100, 200)
    want = emoji()("a star", seed=9, controlnets=[(path, control, 1.0)], resize_mode=2, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == []
    # the extension forces its soft weights on a canny unit in the hires fix's second pass
    hr = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **hr, **COMMON)
    hr_kw = {**kw, "enable_hr": True, "hr_scale": 2, "strength": 0.5}
    want = emoji()(
        "a star", seed=9, controlnets=[ControlUnit(path, control, hires_mode="prompt")], resize_mode=2, **hr_kw
    )
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert "Hires Control Mode: My prompt is more important" in r.info["infotexts"][0]


def test_a_units_hires_option_other_than_both_is_listed(api):
    """sdengine's hires fix runs every ControlNet unit in both passes: a unit's hr_option "Low res only" or
    "High res only" is listed as ignored (once dropped silently)."""
    g = gradient().convert("RGB").resize((32, 32))
    unit = webuiapi.ControlNetUnit(image=g, model="emoji-controlnet-canny", hr_option="Low res only")
    args = {"prompt": "a star", "seed": 9, "steps": 2, "width": 32, "height": 32, "alwayson_scripts": {}}
    r = api.txt2img(controlnet_units=[unit], enable_hr=True, hr_scale=2, denoising_strength=0.6, **args)
    assert r.image.size == (64, 64) and r.info["ignored"] == ["controlnet.args[0].hr_option"]
    unit.hr_option = "Both"
    r = api.txt2img(controlnet_units=[unit], enable_hr=True, hr_scale=2, denoising_strength=0.6, **args)
    assert r.info["ignored"] == []


def test_other_unit_settings_are_listed(api):
    """A ControlNet unit setting of the extension that sdengine does not run (advanced_weighting, ...) is listed
    as ignored (once dropped silently); settings that change no image (low_vram, save_detected_map) are not."""
    unit = {"image": webuiapi.raw_b64_img(gradient()), "model": "emoji-controlnet-canny", "low_vram": True}
    unit |= {"save_detected_map": True, "advanced_weighting": [0.5] * 13}
    r = api.txt2img(prompt="a", seed=1, alwayson_scripts={"controlnet": {"args": [unit]}}, **COMMON)
    assert r.info["ignored"] == ["controlnet.args[0].advanced_weighting"]


def test_only_masked_gives_a_unit_without_image_the_cut_init_image(api):
    """In "Only masked" inpainting a ControlNet unit without an image of its own takes the init image as the
    pipeline gets it: the cut box (once the whole image, a control map of another place and scale)."""
    init = gradient()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 56))
    unit = {"model": "emoji-controlnet-canny", "module": "none", "resize_mode": "Just Resize"}
    r = api.img2img(
        images=[init],
        mask_image=mask,
        prompt="a ball",
        seed=3,
        denoising_strength=0.8,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=True,
        alwayson_scripts={"controlnet": {"args": [unit]}},
        **COMMON,
    )
    region = (0, 8, 48, 56)  # as in test_only_masked_inpainting_and_fill_as_a1111
    cut = init.crop(region).resize((64, 64), Image.Resampling.LANCZOS)
    cut_mask = mask.crop(region).resize((64, 64), Image.Resampling.LANCZOS)
    path = BUILTIN_CONTROLNETS["emoji-controlnet-canny"]
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **COMMON}
    ref = emoji()("a ball", seed=3, init_image=cut, mask=cut_mask, strength=0.8, controlnets=[(path, cut, 1.0)], **kw)
    canvas = init.convert("RGB")
    canvas.paste(ref.images[0].resize((48, 48), Image.Resampling.LANCZOS), region[:2])
    np.testing.assert_array_equal(arr(r.image), arr(Image.composite(canvas, init.convert("RGB"), mask)))


def test_a1111s_k_sampler_aliases(api):
    """A1111's samplers answer to their k-diffusion aliases (k_dpmpp_2m, k_euler_a, ...), listed in /samplers;
    once a 400."""
    body = {"prompt": "a cat", "seed": 2, "scheduler": "Karras", **COMMON}
    named = api.custom_post("txt2img", {**body, "sampler_name": "DPM++ 2M"}, baseurl=True)
    aliased = api.custom_post("txt2img", {**body, "sampler_name": "k_dpmpp_2m"}, baseurl=True)
    np.testing.assert_array_equal(arr(aliased.image), arr(named.image))
    assert aliased.info["sampler_name"] == "DPM++ 2M"
    listed = {s["name"]: s["aliases"] for s in api.get_samplers()}
    assert "k_dpmpp_2m" in listed["DPM++ 2M"] and "k_euler_a" in listed["Euler a"]
    assert (
        "Euler CFG++" not in listed and "DEIS" not in listed and "iPNDM" not in listed and "HeunPP2" not in listed
    )  # ComfyUI's, which A1111 does not have


def test_infotext_fills_the_fields_not_sent(api):
    """A1111's infotext request field (once listed as ignored, the request run without it): the fields not sent
    are read from it (prompt, steps, sampler, schedule, cfg, seed, size, variation seed, ...); a field sent
    wins; an infotext that cannot be read is a 400."""
    text = "a red apple\\nNegative prompt: ugly\\nSteps: 4, Sampler: Euler a, Schedule type: Karras, CFG scale: 5, "
    text = text.replace("\\n", "\n") + "Seed: 11, Size: 64x48, Variation seed: 3, Variation seed strength: 0.3"
    r = api.custom_post("txt2img", {"infotext": text, "steps": 3}, baseurl=True)  # steps sent: 3 wins over 4
    want = emoji()(
        "a red apple",
        negative_prompt="ugly",
        steps=3,
        sampler="euler_a",
        schedule="karras",
        cfg_scale=5.0,
        seed=11,
        width=64,
        height=48,
        subseed=3,
        subseed_strength=0.3,
        noise_source="nv",  # no "RNG" in an A1111 infotext: its default GPU source, NVIDIA's numbers
        progress=False,
    )
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["infotexts"] == want.infotexts and r.info["ignored"] == []
    body = {"infotext": "a\nSteps: 3, Sampler: Nope, CFG scale: 7", **COMMON}
    bad = httpx.post(f"{api.baseurl}/txt2img", json=body, timeout=30)
    assert bad.status_code == 400 and "infotext" in bad.text and "Nope" in bad.text, bad.text


def test_eta_is_the_samplers_option_where_it_takes_one(api):
    """A1111's eta (once listed as ignored): the option of the samplers that take one (Euler a, DDIM, the SDE
    ones); with one that has none (Euler) it changes nothing, in A1111 too, and is not listed."""
    kw = {"schedule": "karras", "progress": False, **COMMON}
    body = {"prompt": "a cat", "seed": 6, "scheduler": "Karras", **COMMON}
    r = api.custom_post("txt2img", {**body, "sampler_name": "Euler a", "eta": 0.3}, baseurl=True)
    want = emoji()("a cat", seed=6, sampler="euler_a", sampler_options={"eta": 0.3}, **kw)
    plain = emoji()("a cat", seed=6, sampler="euler_a", **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert not np.array_equal(arr(want.images[0]), arr(plain.images[0])) and r.info["ignored"] == []
    r = api.custom_post("txt2img", {**body, "sampler_name": "Euler", "eta": 0.3}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(emoji()("a cat", seed=6, sampler="euler", **kw).images[0]))
    assert r.info["ignored"] == []
    bad = httpx.post(f"{api.baseurl}/txt2img", json={**body, "sampler_name": "Euler a", "eta": 50}, timeout=30)
    assert bad.status_code == 400 and "eta must be a number in [0, 10]" in bad.text
    # webuiapi sends eta 1.0, Euler a's own default: the plain image, and (as A1111) no eta in the infotext
    r = api.txt2img(prompt="a cat", seed=6, sampler_name="Euler a", scheduler="Karras", **COMMON)
    np.testing.assert_array_equal(arr(r.image), arr(plain.images[0]))
    assert "Sampler options" not in r.info["infotexts"][0] and "Eta" not in r.info["infotexts"][0]
    # nor is it an eta a hires second-pass sampler without one would drop (once listed as ignored: it changes nothing)
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_sampler_name": "Euler"}
    r = api.txt2img(prompt="a cat", seed=6, sampler_name="Euler a", **hires, **COMMON)
    assert r.info["ignored"] == []
    r = api.txt2img(prompt="a cat", seed=6, sampler_name="Euler a", eta=0.3, **hires, **COMMON)
    assert r.info["ignored"] == ["eta"]


def test_tiling_and_seed_resize_as_a1111(api):
    """tiling and seed_resize_from_w/_h (once listed as ignored: another image than A1111's) run as the Python
    API's tiling / seed_resize_from_*, are written in the infotext as A1111 writes them and read back from it."""
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "progress": False, **COMMON}
    r = api.txt2img(prompt="a star", seed=9, tiling=True, seed_resize_from_w=48, seed_resize_from_h=80, **COMMON)
    want = emoji()("a star", seed=9, tiling=True, seed_resize_from_w=48, seed_resize_from_h=80, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == [] and (r.info["seed_resize_from_w"], r.info["seed_resize_from_h"]) == (48, 80)
    assert "Seed resize from: 48x80" in r.info["infotexts"][0] and "Tiling: True" in r.info["infotexts"][0]
    plain = emoji()("a star", seed=9, **kw)
    assert not np.array_equal(arr(r.image), arr(plain.images[0]))
    # one side only: A1111 draws the noise as without it; the same image, nothing ignored
    r = api.txt2img(prompt="a star", seed=9, seed_resize_from_w=48, seed_resize_from_h=-1, **COMMON)
    np.testing.assert_array_equal(arr(r.image), arr(plain.images[0]))
    assert r.info["ignored"] == []
    # the infotext field fills the request (A1111's apply_infotext)
    body = {"infotext": want.infotexts[0]}
    got = httpx.post(f"{api.baseurl}/txt2img", json=body, timeout=60).json()
    image = Image.open(io.BytesIO(base64.b64decode(got["images"][0])))
    np.testing.assert_array_equal(arr(image), arr(want.images[0]))
    bad = httpx.post(f"{api.baseurl}/txt2img", json={"prompt": "a", "tiling": "yes", **COMMON}, timeout=60)
    assert bad.status_code == 400 and "tiling must be true or false" in bad.text, bad.text
    bad = httpx.post(
        f"{api.baseurl}/txt2img",
        json={"prompt": "a", "seed_resize_from_w": 10**6, "seed_resize_from_h": 64},
        timeout=60,
    )
    assert bad.status_code == 400 and "seed_resize_from_w must be in" in bad.text, bad.text


def test_controlnet_detected_maps_are_appended(api):
    """The extension appends each unit's detected map (the preprocessed control image, fitted to the image size)
    after the images, unless the unit's save_detected_map is false or the "Do not append detectmap to output"
    option (control_net_no_detectmap) is on; once sdengine answered the images alone."""
    from sdengine.control import canny
    from sdengine.io.resize import resize_image

    g = gradient().convert("RGB").resize((96, 64))
    unit = webuiapi.ControlNetUnit(image=g, module="canny", model="emoji-controlnet-canny", processor_res=64)
    unit.threshold_a, unit.threshold_b = 100, 200
    r = api.txt2img(prompt="a star", seed=9, batch_size=2, controlnet_units=[unit], alwayson_scripts={}, **COMMON)
    assert len(r.images) == 3 and len(r.info["infotexts"]) == 2  # two images, then the unit's map
    want = resize_image(canny(g, 100, 200), 64, 64, "resize and fill")  # webuiapi's default resize mode
    np.testing.assert_array_equal(arr(r.images[2]), arr(want))
    body = {"prompt": "a star", "seed": 9, **COMMON}
    raw = {**unit.to_dict(), "save_detected_map": False}  # an API-only field webuiapi does not send
    got = httpx.post(
        f"{api.baseurl}/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [raw]}}}, timeout=60
    ).json()
    assert len(got["images"]) == 1
    for bad in ({**raw, "save_detected_map": "no"}, raw):  # not a bool: refused, never guessed
        over = {} if bad is not raw else {"override_settings": {"control_net_no_detectmap": 1}}
        body_bad = {**body, "alwayson_scripts": {"controlnet": {"args": [bad]}}, **over}
        refused = httpx.post(f"{api.baseurl}/txt2img", json=body_bad, timeout=60)
        assert refused.status_code == 400 and "must be true or false" in refused.text, refused.text
    over = {"control_net_no_detectmap": True}
    r = api.txt2img(
        prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, override_settings=over, **COMMON
    )
    assert len(r.images) == 1 and r.info["ignored"] == []
    try:
        api.set_options({"control_net_no_detectmap": True})
        r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **COMMON)
        assert len(r.images) == 1
    finally:
        api.set_options({"control_net_no_detectmap": False})
    r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **COMMON)
    assert len(r.images) == 2
    # with the hires fix the extension stores the map at the final size first, then the first pass's
    hr = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **hr, **COMMON)
    assert [im.size for im in r.images] == [(128, 128), (128, 128), (64, 64)]
    np.testing.assert_array_equal(arr(r.images[2]), arr(want))


def test_options_sdengine_runs_one_way_are_answered_so_and_refused_otherwise(api):
    """A1111's options that change the image but that sdengine runs one way only (face_restoration,
    sd_vae, emphasis, token merging, ...) were answered "ignored" (a later request ran without face restoration
    where A1111 restores): another value is now a 400 naming the option, as an option or an override, and changes
    nothing; GET /options answers the values the server runs, which can be sent back whole."""
    url = f"{api.baseurl}/options"
    got = httpx.get(url, timeout=30).json()
    assert (got["randn_source"], got["face_restoration"], got["sd_vae"], got["emphasis"]) == (
        "CPU", False, "Automatic", "Original"
    )  # fmt: skip
    # A1111's defaults (shared_options.py), which the server runs: UniPC bh1 of order 3
    assert (got["eta_ancestral"], got["eta_ddim"], got["uni_pc_variant"], got["uni_pc_order"]) == (1.0, 0.0, "bh1", 3)
    for body, said in (
        ({"face_restoration": True}, "face_restoration True: face restoration (GFPGAN, CodeFormer) is not available"),
        ({"randn_source": "TPU"}, "randn_source must be one of GPU, NV, CPU, got 'TPU'"),
        ({"sd_vae": "vae-ft-mse"}, "sd_vae: unknown VAE 'vae-ft-mse'; available: Automatic, None, none"),
        ({"emphasis": "No norm"}, "emphasis 'No norm': sdengine's prompt weighting is A1111's Original emphasis"),
        ({"token_merging_ratio": 0.5}, "token_merging_ratio 0.5: token merging (ToMe) is not implemented"),
        ({"uni_pc_variant": "vary_coeff"}, "uni_pc_variant 'vary_coeff': sdengine's UniPC has bh1 and bh2"),
        ({"uni_pc_order": 4}, "uni_pc_order 4: sdengine's UniPC takes order 1, 2 or 3"),
        ({"eta_ancestral": True}, "eta_ancestral must be a number in [0, 10], got True"),
        ({"tiling": False, "face_restoration": 1}, "face_restoration 1: "),  # 1 is no false; nothing is set
    ):
        bad = httpx.post(url, json=body, timeout=30)
        assert bad.status_code == 400 and said in bad.json()["detail"], (body, bad.text)
        assert "\n" not in bad.json()["detail"]
    assert httpx.get(url, timeout=30).json() == got  # nothing changed
    sent = httpx.post(url, json=got, timeout=30).json()  # a client sends the answer back whole: all taken
    assert "randn_source" in sent["applied"] and "face_restoration" in sent["applied"], sent
    assert httpx.get(url, timeout=30).json() == got
    # the same as overrides, before any work; restore_faces false restores nothing in A1111: only listed then
    body = {"prompt": "a", "steps": 1, "width": 64, "height": 64}
    r = httpx.post(f"{api.baseurl}/txt2img", json={**body, "override_settings": {"sd_vae": "x"}}, timeout=60)
    assert r.status_code == 400 and "override_settings.sd_vae: unknown VAE 'x'" in r.text, r.text
    over = {"randn_source": "CPU", "face_restoration": True, "eta_noise_seed_delta": 0}
    r = api.custom_post("txt2img", {**body, "restore_faces": False, "override_settings": over}, baseurl=True)
    assert r.info["ignored"] == ["override_settings.face_restoration"]


def test_sampler_options_are_the_fields_of_requests_that_give_none(api):
    """A1111's eta_ancestral / eta_ddim / s_churn / s_noise / ... options (once answered "ignored") are the values
    of a request that gives no eta, s_churn, ... (as an option or an override), as A1111's; a request's own field
    wins; uni_pc_variant / uni_pc_order are UniPC's variant and order (the server's default: A1111's bh1 of order
    3)."""
    small = {"steps": 2, "width": 32, "height": 32, "cfg_scale": 7.0}
    kw = {"schedule": "karras", "progress": False, **small}
    body = {"prompt": "a cat", "seed": 6, "scheduler": "Karras", **small}
    want = arr(emoji()("a cat", seed=6, sampler="euler_a", sampler_options={"eta": 0.4}, **kw).images[0])
    plain = arr(emoji()("a cat", seed=6, sampler="euler_a", **kw).images[0])
    try:
        assert api.set_options({"eta_ancestral": 0.4})["applied"] == ["eta_ancestral"]
        r = api.custom_post("txt2img", {**body, "sampler_name": "Euler a"}, baseurl=True)
        np.testing.assert_array_equal(arr(r.image), want)
        r = api.custom_post("txt2img", {**body, "sampler_name": "Euler a", "eta": 1.0}, baseurl=True)
        np.testing.assert_array_equal(arr(r.image), plain)  # the request's own eta wins
    finally:
        api.set_options({"eta_ancestral": 1.0})
    over = {"s_churn": 2.0, "s_noise": 0.9}
    r = api.custom_post("txt2img", {**body, "sampler_name": "Euler", "override_settings": over}, baseurl=True)
    churned = emoji()("a cat", seed=6, sampler="euler", sampler_options=over, **kw).images[0]
    np.testing.assert_array_equal(arr(r.image), arr(churned))
    assert r.info["ignored"] == [] and "Sigma churn: 2," in r.info["infotexts"][0]
    over = {"uni_pc_variant": "bh2", "uni_pc_order": 2}
    r = api.custom_post("txt2img", {**body, "sampler_name": "UniPC", "override_settings": over}, baseurl=True)
    unipc = emoji()("a cat", seed=6, sampler="unipc", sampler_options={"variant": "bh2", "order": 2}, **kw)
    np.testing.assert_array_equal(arr(r.image), arr(unipc.images[0]))
    assert r.info["ignored"] == []


def test_unipc_runs_a1111s_defaults_and_writes_a1111s_fields(api):
    """A1111's UniPC defaults are bh1 of order 3 (its uni_pc_variant / uni_pc_order); the A1111 routes ran
    sdengine's own (bh2 of order 2): another image for every UniPC request. Now a UniPC request without options
    is sdengine's UniPC with bh1 of order 3, and its infotext writes A1111's "UniPC variant" / "UniPC order"
    fields (not "Sampler options", which A1111 does not read); an A1111 infotext without them (A1111 writes
    them only where not its defaults) runs A1111's defaults again."""
    small = {"steps": 6, "width": 32, "height": 32, "cfg_scale": 7.0}  # order 3 needs steps to show
    kw = {"schedule": "karras", "progress": False, **small}
    r = api.txt2img(prompt="a cat", seed=6, sampler_name="UniPC", **small)
    a1111 = emoji()("a cat", seed=6, sampler="unipc", sampler_options={"variant": "bh1", "order": 3}, **kw)
    own = emoji()("a cat", seed=6, sampler="unipc", **kw)  # sdengine's UniPC's own defaults
    np.testing.assert_array_equal(arr(r.image), arr(a1111.images[0]))
    assert not np.array_equal(arr(a1111.images[0]), arr(own.images[0]))
    text = r.info["infotexts"][0]
    assert "UniPC variant: bh1, UniPC order: 3" in text and "Sampler options" not in text, text
    assert r.info["ignored"] == []
    # an A1111 infotext of that image (no UniPC fields: A1111's defaults; "RNG: CPU" as the image's noise)
    a1111_text = (
        "a cat\nSteps: 6, Sampler: UniPC, Schedule type: Karras, CFG scale: 7, Seed: 6, Size: 32x32, RNG: CPU, "
        "Version: v1.10.1"
    )
    again = api.custom_post("txt2img", {"infotext": a1111_text}, baseurl=True)
    np.testing.assert_array_equal(arr(again.image), arr(a1111.images[0]))
    # an sdengine infotext without them (written before they were) is sdengine's own UniPC
    own_text = own.infotexts[0].replace(", UniPC variant: bh2, UniPC order: 2", "")
    assert "UniPC" not in own_text.split("Sampler: UniPC")[1]
    again = api.custom_post("txt2img", {"infotext": own_text}, baseurl=True)
    np.testing.assert_array_equal(arr(again.image), arr(own.images[0]))


def test_eta_is_written_as_a1111s_eta_and_eta_ddim_fields(api):
    """A1111 writes a sampler's eta as "Eta" (its k-diffusion samplers, where not 1) or "Eta DDIM" (DDIM, where
    not 0); sdengine wrote it in its own "Sampler options" JSON, which A1111 does not read (its image came back
    without the eta). Both are read back: the infotext alone makes the image again."""
    body = {"prompt": "a cat", "seed": 6, **COMMON}
    for sampler, field in (("Euler a", "Eta: 0.3,"), ("DDIM", "Eta DDIM: 0.3,")):
        r = api.txt2img(sampler_name=sampler, eta=0.3, **body)
        text = r.info["infotexts"][0]
        assert field in text and "Sampler options" not in text, text
        again = api.custom_post("txt2img", {"infotext": text}, baseurl=True)
        np.testing.assert_array_equal(arr(again.image), arr(r.image))
        plain = api.txt2img(sampler_name=sampler, eta=1.0 if sampler == "Euler a" else 0.0, **body)
        assert not np.array_equal(arr(plain.image), arr(r.image))  # the eta matters
        assert "Eta" not in plain.info["infotexts"][0]  # the default: not written, as A1111


def test_an_a1111_infotext_without_rng_runs_a1111s_gpu_noise(api):
    """A1111 writes no "RNG" for its default GPU source (NVIDIA's numbers: sdengine's noise_source "nv"); the
    server ran such an infotext with its own CPU default: another image. An sdengine infotext without one is
    sdengine's CPU noise (it writes "RNG: NV" for the other), whatever the server's option."""
    head = "a cat\nSteps: 3, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 6, Size: 64x64"
    kw = {"sampler": "euler_a", "schedule": "karras", "progress": False, **COMMON}
    nv = emoji()("a cat", seed=6, noise_source="nv", **kw)
    cpu = emoji()("a cat", seed=6, **kw)
    r = api.custom_post("txt2img", {"infotext": f"{head}, Version: v1.10.1"}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(nv.images[0]))
    assert "RNG: NV" in r.info["infotexts"][0]
    r = api.custom_post("txt2img", {"infotext": f"{head}, RNG: CPU, Version: v1.10.1"}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(cpu.images[0]))
    try:
        assert api.set_options({"randn_source": "GPU"})["applied"] == ["randn_source"]
        r = api.custom_post("txt2img", {"infotext": cpu.infotexts[0]}, baseurl=True)  # sdengine's own: its CPU
        np.testing.assert_array_equal(arr(r.image), arr(cpu.images[0]))
    finally:
        api.set_options({"randn_source": "CPU"})


def test_a_transparent_init_image_is_laid_over_the_background_colour(api):
    """A1111 lays an RGBA init image over its img2img_background_color (white) before img2img; sdengine once
    dropped the alpha, keeping whatever colour lay under the transparent pixels (here green): another image."""
    init = Image.new("RGBA", (32, 32), (0, 255, 0, 0))  # transparent green
    init.paste((200, 30, 30, 255), (0, 0, 16, 32))
    small = {"steps": 2, "width": 32, "height": 32, "cfg_scale": 7.0}

    def want(color):
        flat = Image.alpha_composite(Image.new("RGBA", init.size, color), init).convert("RGB")
        ref = emoji()("a", seed=3, init_image=flat, strength=0.5, strength_rule="a1111", sampler="dpmpp_2m",
                      schedule="karras", progress=False, **small)  # fmt: skip
        return arr(ref.images[0])

    r = api.img2img(images=[init], prompt="a", seed=3, denoising_strength=0.5, **small)
    np.testing.assert_array_equal(arr(r.image), want((255, 255, 255, 255)))
    blue = {"img2img_background_color": "#0000FF"}
    r = api.img2img(images=[init], prompt="a", seed=3, denoising_strength=0.5, override_settings=blue, **small)
    np.testing.assert_array_equal(arr(r.image), want((0, 0, 255, 255)))
    assert r.info["ignored"] == []
    bad = httpx.post(f"{api.baseurl}/options", json={"img2img_background_color": "white"}, timeout=30)
    assert bad.status_code == 400 and "img2img_background_color must be a colour as #rrggbb" in bad.text, bad.text


def test_churn_and_s_noise_are_k_diffusions_options_as_a1111_passes_them(api):
    """s_churn / s_tmin / s_tmax / s_noise (once listed as ignored): passed to the samplers A1111 passes them to
    (churn: Euler, Heun, DPM2; s_noise: those and DPM2 a, DPM++ SDE, DPM++ 2M SDE), written in the infotext as
    A1111 writes them (only when not the default; s_tmax 0 = no bound) and read back from it."""
    kw = {"schedule": "karras", "progress": False, **COMMON}
    body = {"prompt": "a cat", "seed": 6, "scheduler": "Karras", **COMMON}
    r = api.txt2img(prompt="a cat", seed=6, sampler_name="Euler", scheduler="Karras", s_churn=2.0, s_tmin=0.5,
                    s_noise=0.9, **COMMON)  # fmt: skip
    options = {"s_churn": 2.0, "s_tmin": 0.5, "s_noise": 0.9}
    want = emoji()("a cat", seed=6, sampler="euler", sampler_options=options, **kw)
    plain = emoji()("a cat", seed=6, sampler="euler", **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert not np.array_equal(arr(want.images[0]), arr(plain.images[0])) and r.info["ignored"] == []
    text = r.info["infotexts"][0]
    assert "Sigma churn: 2," in text and "Sigma tmin: 0.5," in text and "Sigma noise: 0.9," in text, text
    assert "Sigma tmax" not in text and "Sampler options" not in text
    again = api.custom_post("txt2img", {"infotext": text, **COMMON}, baseurl=True)  # read back from the infotext
    np.testing.assert_array_equal(arr(again.image), arr(want.images[0]))
    # s_noise scales DPM2 a's fresh noise
    r = api.custom_post("txt2img", {**body, "sampler_name": "DPM2 a", "s_noise": 0.5}, baseurl=True)
    # (under A1111's rules: DPM2 a drops its grid's next-to-last sigma)
    want = emoji()("a cat", seed=6, sampler="dpm2_a", sampler_options={"s_noise": 0.5}, strength_rule="a1111", **kw)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert "Sigma noise: 0.5" in r.info["infotexts"][0]
    # a sampler that takes none (DPM++ 2M; in A1111 too) is the plain image, and the answer says so
    r = api.custom_post("txt2img", {**body, "sampler_name": "DPM++ 2M", "s_churn": 2.0}, baseurl=True)
    plain = emoji()("a cat", seed=6, sampler="dpmpp_2m", **kw)
    np.testing.assert_array_equal(arr(r.image), arr(plain.images[0]))
    assert r.info["ignored"] == [] and any(n.startswith("s_churn: the sampler DPM++ 2M") for n in r.info["notes"])
    bad = httpx.post(f"{api.baseurl}/txt2img", json={**body, "sampler_name": "Euler", "s_churn": 500}, timeout=30)
    assert bad.status_code == 400 and "s_churn must be a number in [0, 100]" in bad.text, bad.text


def test_initial_noise_multiplier_scales_img2imgs_noise_as_a1111(api):
    """img2img's initial_noise_multiplier (once listed as ignored): the noise added to the init latent times it, as
    the Python API's noise_multiplier; infotext "Noise multiplier" as A1111's, read back from an infotext. A1111's
    txt2img has no such field: there it stays listed as ignored."""
    init = gradient()
    r = api.img2img(images=[init], prompt="a blue ball", seed=3, denoising_strength=0.5, initial_noise_multiplier=0.7,
                    **COMMON)  # fmt: skip
    want = python_img2img("a blue ball", init, noise_multiplier=0.7)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert not np.array_equal(arr(r.image), arr(python_img2img("a blue ball", init).images[0]))
    assert r.info["ignored"] == [] and "Noise multiplier: 0.7," in r.info["infotexts"][0]
    b64 = webuiapi.raw_b64_img(init)
    again = api.custom_post("img2img", {"init_images": [b64], "infotext": r.info["infotexts"][0]}, baseurl=True)
    np.testing.assert_array_equal(arr(again.image), arr(want.images[0]))
    r = api.custom_post("txt2img", {"prompt": "a", "seed": 1, "initial_noise_multiplier": 0.7, **COMMON}, baseurl=True)
    assert r.info["ignored"] == ["initial_noise_multiplier"]
    bad = httpx.post(f"{api.baseurl}/img2img", json={"init_images": [b64], "initial_noise_multiplier": -2}, timeout=30)
    assert bad.status_code == 400 and "noise_multiplier must be a number in [0, 10]" in bad.text, bad.text


def test_the_noise_multiplier_option_and_override_are_img2imgs_default(api):
    """A1111's ``initial_noise_multiplier`` option (and override) is img2img's noise multiplier when a request gives
    none (its StableDiffusionProcessingImg2Img reads opts); once listed as ignored. A request's own field wins (A1111
    reads the option before it applies override_settings, so there an override does nothing: here it is honoured);
    txt2img has none, so there the override stays listed as ignored; a bad value is a 400 that changes nothing."""
    init = gradient()
    want = arr(python_img2img("a blue ball", init, noise_multiplier=0.7).images[0])
    plain = arr(python_img2img("a blue ball", init).images[0])
    # webuiapi sends initial_noise_multiplier 1 unless told None (null: A1111 then reads its option)
    args = dict(images=[init], prompt="a blue ball", seed=3, denoising_strength=0.5, initial_noise_multiplier=None)
    args.update(COMMON)
    try:
        assert api.set_options({"initial_noise_multiplier": 0.7})["applied"] == ["initial_noise_multiplier"]
        r = api.img2img(**args)
        np.testing.assert_array_equal(arr(r.image), want)
        assert r.info["ignored"] == [] and "Noise multiplier: 0.7," in r.info["infotexts"][0]
        np.testing.assert_array_equal(arr(api.img2img(**{**args, "initial_noise_multiplier": 1.0}).image), plain)
    finally:
        api.set_options({"initial_noise_multiplier": 1.0})
    r = api.img2img(override_settings={"initial_noise_multiplier": 0.7}, **args)
    np.testing.assert_array_equal(arr(r.image), want)
    assert r.info["ignored"] == []
    np.testing.assert_array_equal(arr(api.img2img(**args).image), plain)  # the override did not stay
    r = api.txt2img(prompt="a", seed=1, override_settings={"initial_noise_multiplier": 0.7}, **COMMON)
    assert r.info["ignored"] == ["override_settings.initial_noise_multiplier"]
    bad = httpx.post(f"{api.baseurl}/options", json={"initial_noise_multiplier": -1}, timeout=30)
    assert bad.status_code == 400 and "initial_noise_multiplier must be a number in [0, 10]" in bad.text, bad.text
    assert httpx.get(f"{api.baseurl}/options", timeout=30).json()["initial_noise_multiplier"] == 1.0


def test_styles_are_merged_into_the_prompts_as_a1111_merges_them(api):
    """A1111's prompt styles (once only listed as ignored): the server's --styles-file, listed by prompt-styles;
    a style's {prompt} takes the prompt, another style text is appended after ", ", in the order given, to the
    prompt and the negative prompt; info keeps the request's prompt and names the styled ones, as A1111's. An
    unknown name is a 400 naming the known ones (A1111 would run the prompt without it)."""
    assert api.get_prompt_styles() == [
        {"name": "Film", "prompt": "film still of {prompt}, grain", "negative_prompt": "blurry"},
        {"name": "Sharp", "prompt": "sharp focus", "negative_prompt": ""},
    ]
    r = api.txt2img(prompt="a cat", negative_prompt="ugly", styles=["Film", "Sharp"], seed=4, **COMMON)
    want = emoji()("film still of a cat, grain, sharp focus", "ugly, blurry", seed=4, sampler="dpmpp_2m",
                   schedule="karras", progress=False, **COMMON)  # fmt: skip
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == [] and r.info["styles"] == ["Film", "Sharp"]
    assert r.info["prompt"] == "a cat" and r.info["all_prompts"] == ["film still of a cat, grain, sharp focus"]
    assert r.info["all_negative_prompts"] == ["ugly, blurry"] and r.parameters["prompt"] == "a cat"
    assert r.info["infotexts"][0].startswith("film still of a cat, grain, sharp focus\nNegative prompt: ugly, blurry")
    r = api.txt2img(prompt="a cat", styles=["Film"], seed=4, enable_hr=True, hr_scale=1.5, hr_prompt="a dog", **COMMON)
    assert 'Hires prompt: "film still of a dog, grain",' in r.info["infotexts"][0]  # the hires fix's own prompt too
    init = gradient()  # img2img too
    r = api.img2img(images=[init], prompt="", styles=["Sharp"], seed=3, denoising_strength=0.5, **COMMON)
    np.testing.assert_array_equal(arr(r.image), arr(python_img2img("sharp focus", init).images[0]))
    bad = httpx.post(f"{api.baseurl}/txt2img", json={"prompt": "a", "styles": ["Film", "Noir"]}, timeout=30)
    assert bad.status_code == 400, bad.text
    assert "unknown style 'Noir'; the server's styles: Film, Sharp" in bad.json()["detail"], bad.text


def test_the_styles_file_is_read_again_when_it_changes(api, server):
    """Edited while the server runs, the styles file is read again (A1111 needs its refresh button); one broken
    since start is a 500 that says so; a server without one lists none and refuses a style name in one line."""
    path = server.services.config.styles_file
    before = path.read_bytes()
    try:
        path.write_text("name,prompt\nNoir,noir {prompt}\n")
        assert api.get_prompt_styles() == [{"name": "Noir", "prompt": "noir {prompt}", "negative_prompt": ""}]
        path.write_bytes(b"\xff\xfe")
        r = httpx.get(f"{api.baseurl}/prompt-styles", timeout=30)
        assert r.status_code == 500 and "styles file cannot be read" in r.json()["detail"], r.text
        server.services.config.styles_file = None
        assert api.get_prompt_styles() == []
        bad = httpx.post(f"{api.baseurl}/txt2img", json={"prompt": "a", "styles": ["Film"]}, timeout=30)
        assert bad.status_code == 400, bad.text
        assert "the server has no styles file (sdengine serve --styles-file FILE)" in bad.json()["detail"]
    finally:
        server.services.config.styles_file = path
        path.write_bytes(before)


def test_controlnet_detect_is_the_extensions_preprocessor_run(api):
    """POST /controlnet/detect (the extension's; once a 404, so webuiapi's controlnet_detect failed): each image
    scaled to processor_res on its short side, then the module's preprocessor, exactly the map a unit with those
    settings gets; webuiapi's own body name (controlnet_images) is read as the extension's
    controlnet_input_images. An unknown module or no image is the extension's 422."""
    from sdengine.control import canny, threshold
    from sdengine.server.a1111 import processor_resize

    g = gradient().resize((96, 64))
    r = api.controlnet_detect([g, gradient()], module="canny", processor_res=128, threshold_a=50, threshold_b=150)
    assert r.info == "Success" and len(r.images) == 2
    want = canny(processor_resize(g.convert("RGB"), 128), low=50, high=150)
    assert r.images[0].size == (192, 128) and want.size == (192, 128)
    np.testing.assert_array_equal(arr(r.images[0]), arr(want))
    body = {"controlnet_module": "threshold", "controlnet_input_images": [webuiapi.raw_b64_img(g)],
            "controlnet_processor_res": 64, "controlnet_threshold_a": 100}  # fmt: skip
    got = api.custom_post("controlnet/detect", body).images[0]
    np.testing.assert_array_equal(arr(got), arr(threshold(processor_resize(g.convert("RGB"), 64), threshold=100)))
    none = api.custom_post("controlnet/detect", {**body, "controlnet_module": "none"}).images[0]
    np.testing.assert_array_equal(arr(none), arr(g))  # "none": the image as it came
    for bad, message in (
        ({**body, "controlnet_module": "openpose"}, "Module not available: 'openpose'; available: none, canny"),
        ({**body, "controlnet_input_images": []}, "No image selected"),
    ):
        r = httpx.post(f"{api.baseurl.removesuffix('/sdapi/v1')}/controlnet/detect", json=bad, timeout=30)
        assert r.status_code == 422 and message in r.json()["detail"], r.text
    r = httpx.post(f"{api.baseurl.removesuffix('/sdapi/v1')}/controlnet/detect", json={**body, "frob": 1}, timeout=30)
    assert r.status_code == 400 and "unknown detect fields: frob" in r.text


def test_eta_noise_seed_delta_is_a1111s_ensd(api):
    """override_settings.eta_noise_seed_delta and the option (once listed as ignored: another image than A1111's
    for the ancestral samplers): the Python API's noise_seed_delta; infotext "ENSD", which an infotext request
    field sets again (as A1111's apply_infotext)."""
    kw = {"sampler": "euler_a", "schedule": "karras", "progress": False, **COMMON}
    want = emoji()("a cat", seed=6, noise_seed_delta=31337, **kw)
    assert not np.array_equal(arr(want.images[0]), arr(emoji()("a cat", seed=6, **kw).images[0]))
    body = {"prompt": "a cat", "seed": 6, "sampler_name": "Euler a", "scheduler": "Karras", **COMMON}
    r = api.custom_post("txt2img", {**body, "override_settings": {"eta_noise_seed_delta": 31337}}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == [] and "ENSD: 31337," in r.info["infotexts"][0]
    text = r.info["infotexts"][0]
    try:
        assert api.set_options({"eta_noise_seed_delta": 31337})["applied"] == ["eta_noise_seed_delta"]
        assert api.get_options()["eta_noise_seed_delta"] == 31337
        r = api.custom_post("txt2img", body, baseurl=True)
        np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    finally:
        api.set_options({"eta_noise_seed_delta": 0})
    r = api.custom_post("txt2img", {"infotext": text, **COMMON}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    bad = httpx.post(f"{api.baseurl}/options", json={"eta_noise_seed_delta": -5}, timeout=30)
    assert bad.status_code == 400 and "eta_noise_seed_delta must be an integer" in bad.text, bad.text


def test_randn_source_nv_and_gpu_draw_nvidias_numbers(api):
    """A1111's randn_source (override and option): GPU and NV are the Python API's noise_source "nv" (NVIDIA's
    numbers, sdengine.diffusion.philox), CPU its default; infotext "RNG: NV", which an infotext request reads back."""
    kw = {"sampler": "euler_a", "schedule": "karras", "progress": False, **COMMON}
    want = emoji()("a cat", seed=6, noise_source="nv", **kw)  # another image than CPU's: tests/test_philox.py
    body = {"prompt": "a cat", "seed": 6, "sampler_name": "Euler a", "scheduler": "Karras", **COMMON}
    assert api.get_options()["randn_source"] == "CPU"
    r = api.custom_post("txt2img", {**body, "override_settings": {"randn_source": "GPU"}}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == [] and "RNG: NV" in r.info["infotexts"][0]
    text = r.info["infotexts"][0]
    try:
        assert api.set_options({"randn_source": "NV"})["applied"] == ["randn_source"]
        np.testing.assert_array_equal(arr(api.custom_post("txt2img", body, baseurl=True).image), arr(want.images[0]))
    finally:
        api.set_options({"randn_source": "CPU"})
    r = api.custom_post("txt2img", {"infotext": text, **COMMON}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    bad = httpx.post(f"{api.baseurl}/options", json={"randn_source": "TPU"}, timeout=30)
    assert bad.status_code == 400 and "randn_source must be one of GPU, NV, CPU" in bad.text, bad.text


def test_inpainting_fill_latent_noise_and_latent_nothing(api):
    """inpainting_fill 2 ("latent noise") and 3 ("latent nothing"), once listed as ignored and run as "original":
    the Python API's masked_content, the init image pasted back outside the mask as with the others."""
    init = gradient()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 56))
    m = a1111_blur(mask, 2, 2)
    for fill, name in ((2, "latent noise"), (3, "latent nothing")):
        r = api.img2img(images=[init], mask_image=mask, prompt="a blue ball", seed=3, denoising_strength=0.8,
                        mask_blur=2, inpainting_fill=fill, inpaint_full_res=False, **COMMON)  # fmt: skip
        kw = {"sampler": "dpmpp_2m", "schedule": "karras", "progress": False, "strength_rule": "a1111", **COMMON}
        # A1111 fills the image under the blurred mask for these too (masking.fill for every fill but "original")
        ref = emoji()("a blue ball", seed=3, init_image=a1111_fill(init, m), mask=m, masked_content=name, strength=0.8,
                      **kw)  # fmt: skip
        np.testing.assert_array_equal(arr(r.image), arr(a1111_overlay(ref.images[0], init, doubled(m))))
        assert r.info["ignored"] == [] and f"Masked content: {name}" in r.info["infotexts"][0]
    with pytest.raises(RuntimeError, match="422.*inpainting_fill 7"):  # A1111 has no such masked content
        api.img2img(images=[init], mask_image=mask, prompt="a", seed=3, inpainting_fill=7, **COMMON)


def test_overrides_stay_set_without_restore_afterwards_as_a1111(api):
    """override_settings_restore_afterwards false (once listed as ignored, the overrides dropped after the call):
    as A1111, the overrides stay set and are the options of later calls; true (the default) changes nothing."""
    over = {"sd_vae_decode_method": "TAESD", "eta_noise_seed_delta": 7}
    try:
        r = api.txt2img(prompt="a cat", seed=1, override_settings=over, **COMMON)  # restore afterwards: true
        assert "Tiny VAE: vae_tiny" in r.info["infotexts"][0] and r.info["ignored"] == []
        assert api.get_options()["sd_vae_decode_method"] == "Full"
        r = api.txt2img(prompt="a cat", seed=1, override_settings=over, override_settings_restore_afterwards=False,
                        **COMMON)  # fmt: skip
        assert r.info["ignored"] == []
        got = api.get_options()
        assert got["sd_vae_decode_method"] == "TAESD" and got["eta_noise_seed_delta"] == 7
        r = api.txt2img(prompt="a cat", seed=1, sampler_name="Euler a", **COMMON)
        assert "Tiny VAE: vae_tiny" in r.info["infotexts"][0] and "ENSD: 7," in r.info["infotexts"][0]
    finally:
        api.set_options({"sd_vae_decode_method": "Full", "eta_noise_seed_delta": 0})


def test_a_size_over_the_models_limit_is_refused_before_any_job(tmp_path):
    """A width over the model's limit (emoji: 512), or a hires fix whose second pass is, was queued as a job, made
    the worker load the model, and failed; the answer was a 400 only after that. Now it is refused up front with
    the native route's message, and no job is made."""
    with live_server(server_config(tmp_path)) as s:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port)
        for kw, message in (
            ({"width": 1024}, "width 1024 is over emoji's limit: each side may be at most 512 px"),
            ({"enable_hr": True, "hr_scale": 16}, "the hires fix's width 1024 (from 64x64) is over emoji's limit"),
        ):
            with pytest.raises(RuntimeError) as e:
                api.txt2img(prompt="x", steps=2, **{"width": 64, "height": 64, **kw})
            status, body = e.value.args
            assert status == 400 and message in body, body
        assert httpx.get(f"{s.url}/v1/jobs").json()["jobs"] == []
        assert all(w.pipe is None for w in s.services.manager.workers)  # no model was loaded for them


def test_a1111s_newer_samplers_and_schedule_types_equal_the_python_api(api):
    """sampler_name "DPM++ 2S a" / "DPM++ 3M SDE" with scheduler "Align Your Steps" / "KL Optimal" (once a 400:
    unknown sampler or schedule) run the Python API's samplers and schedules, and the infotext names them as A1111
    writes them; /sdapi/v1/schedulers lists the new labels."""
    labels = [s["label"] for s in api.get_schedulers()]
    assert {"Simple", "DDIM", "Beta", "KL Optimal", "Align Your Steps", "Uniform", "Polyexponential"} <= set(labels)
    assert labels.count("Align Your Steps") == 1
    assert {"DPM++ 2S a", "DPM++ 3M SDE"} <= {s["name"] for s in api.get_samplers()}
    for sampler, sched, ours in (
        ("DPM++ 2S a", "Align Your Steps", "align_your_steps"),
        ("DPM++ 3M SDE", "KL Optimal", "kl_optimal"),
    ):
        r = api.txt2img(prompt="a red apple", seed=5, sampler_name=sampler, scheduler=sched, **COMMON)
        # under A1111's rules: DPM++ 3M SDE drops its next-to-last sigma and draws a Brownian tree's noise
        kw = {"progress": False, "strength_rule": "a1111", **COMMON}
        want = emoji()("a red apple", seed=5, sampler=sampler, schedule=ours, **kw)
        np.testing.assert_array_equal(arr(r.images[0]), arr(want.images[0]))
        assert r.info["sampler_name"] == sampler and r.info["extra_generation_params"] == {"Schedule type": sched}
        assert f"Sampler: {sampler}, Schedule type: {sched}," in r.info["infotexts"][0]


def test_automatic_schedule_is_what_a1111_runs(api, server):
    """A1111 1.10 runs ``p.scheduler or "Automatic"``, and Automatic is the sampler's own default (Karras for DPM++
    2M) or else k-diffusion's get_sigmas, timesteps 999 ... 0 ("Uniform"); the route once ran the native default
    (the model's diffusers spacing: 901 ... 1 for SD 1.5's leading config) for Euler."""

    want = emoji()("a red apple", seed=5, sampler="euler", schedule="uniform", progress=False, **COMMON)
    r = api.txt2img(prompt="a red apple", seed=5, sampler_name="Euler", scheduler="Automatic", **COMMON)
    np.testing.assert_array_equal(arr(r.images[0]), arr(want.images[0]))
    assert "Sampler: Euler, Schedule type: Uniform," in r.info["infotexts"][0]
    body = {"prompt": "a red apple", "seed": 5, "sampler_name": "Euler", **COMMON}  # no scheduler at all
    for extra in ({}, {"scheduler": None}):
        got = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, **extra}, timeout=120)
        assert got.status_code == 200, got.text
        image = Image.open(io.BytesIO(base64.b64decode(got.json()["images"][0])))
        np.testing.assert_array_equal(arr(image), arr(want.images[0]))
    r = api.txt2img(prompt="a red apple", seed=5, sampler_name="DPM++ 2M SDE", scheduler="Automatic", **COMMON)
    assert "Sampler: DPM++ 2M SDE, Schedule type: Exponential," in r.info["infotexts"][0]


@pytest.mark.slow  # five generations; the grids and the pipeline are held fast in test_discard_penultimate.py and
# test_a1111_fidelity.py
def test_always_discard_next_to_last_sigma_and_dpm2s_own_discard(api):
    """A1111's DPM2 (and DPM2 a, DPM++ 3M SDE) drops its grid's next-to-last sigma, and the option
    always_discard_next_to_last_sigma (once listed as ignored) makes every sampler do so: the Python API's
    discard_penultimate_sigma; infotext "Discard penultimate sigma: True", which an infotext request sets again."""
    kw = {"progress": False, **COMMON}
    dpm2 = emoji()("a cat", seed=6, sampler="dpm2", schedule="karras", strength_rule="a1111", **kw)
    assert not np.array_equal(
        arr(dpm2.images[0]), arr(emoji()("a cat", seed=6, sampler="dpm2", schedule="karras", **kw).images[0])
    )
    r = api.custom_post("txt2img", {"prompt": "a cat", "seed": 6, "sampler_name": "DPM2", **COMMON}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(dpm2.images[0]))
    want = emoji()("a cat", seed=6, sampler="euler", schedule="uniform", discard_penultimate_sigma=True, **kw)
    body = {"prompt": "a cat", "seed": 6, "sampler_name": "Euler", **COMMON}
    over = {"override_settings": {"always_discard_next_to_last_sigma": True}}
    r = api.custom_post("txt2img", {**body, **over}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == [] and "Discard penultimate sigma: True" in r.info["infotexts"][0]
    text = r.info["infotexts"][0]
    try:
        assert api.set_options({"always_discard_next_to_last_sigma": True})["applied"] == [
            "always_discard_next_to_last_sigma"
        ]
        np.testing.assert_array_equal(arr(api.custom_post("txt2img", body, baseurl=True).image), arr(want.images[0]))
    finally:
        api.set_options({"always_discard_next_to_last_sigma": False})
    r = api.custom_post("txt2img", {"infotext": text, **COMMON}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    bad = httpx.post(f"{api.baseurl}/options", json={"always_discard_next_to_last_sigma": 1}, timeout=30)
    assert bad.status_code == 400 and "always_discard_next_to_last_sigma must be true or false" in bad.text
    bad = httpx.post(
        f"{api.baseurl}/txt2img",
        json={**body, "override_settings": {"always_discard_next_to_last_sigma": "on"}},
        timeout=30,
    )
    assert bad.status_code == 400 and "always_discard_next_to_last_sigma must be true or false" in bad.text


@pytest.mark.slow  # three generations; the schedule and the pipeline are held fast in test_zero_terminal_snr.py
def test_sd_noise_schedule_zero_terminal_snr_runs_as_a1111(api):
    """A1111's sd_noise_schedule "Zero Terminal SNR" (once a 400 naming the option) rescales the model's
    alphas_cumprod as A1111 does: the Python API's zero_terminal_snr; infotext "Noise Schedule: Zero Terminal SNR",
    which an infotext request sets again; the option itself too; another value is a 400."""
    kw = {"progress": False, **COMMON}
    want = emoji()("a cat", seed=6, sampler="euler", schedule="uniform", zero_terminal_snr=True, **kw)
    body = {"prompt": "a cat", "seed": 6, "sampler_name": "Euler", **COMMON}
    over = {"override_settings": {"sd_noise_schedule": "Zero Terminal SNR"}}
    r = api.custom_post("txt2img", {**body, **over}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    assert r.info["ignored"] == [] and "Noise Schedule: Zero Terminal SNR" in r.info["infotexts"][0]
    text = r.info["infotexts"][0]
    try:
        assert api.set_options({"sd_noise_schedule": "Zero Terminal SNR"})["applied"] == ["sd_noise_schedule"]
        assert httpx.get(f"{api.baseurl}/options", timeout=30).json()["sd_noise_schedule"] == "Zero Terminal SNR"
        np.testing.assert_array_equal(arr(api.custom_post("txt2img", body, baseurl=True).image), arr(want.images[0]))
    finally:
        api.set_options({"sd_noise_schedule": "Default"})
    r = api.custom_post("txt2img", {"infotext": text, **COMMON}, baseurl=True)
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    bad = httpx.post(f"{api.baseurl}/options", json={"sd_noise_schedule": "Flat"}, timeout=30)
    assert bad.status_code == 400 and "sd_noise_schedule must be one of 'Default', 'Zero Terminal SNR'" in bad.text
    bad = httpx.post(f"{api.baseurl}/txt2img", json={**body, "override_settings": {"sd_noise_schedule": 1}}, timeout=30)
    assert bad.status_code == 400 and "override_settings.sd_noise_schedule must be one of" in bad.text
