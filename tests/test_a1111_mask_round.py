"""A1111's ``mask_round: false`` and ``latent_mask`` (img2img), against references computed by A1111's formulas
(tests/_a1111_masks.py: ``latent_mask`` is its ``latmask``, rounded or not; ``fill`` its ``masking.fill``):

* the pipeline (``GenerationRequest.mask_round`` / ``latent_mask``): every step's x0 is ``D * nmask + init *
  (1 - nmask)`` and the final latent ``samples * nmask + init_latent * (1 - nmask)`` with A1111's latent mask made
  from the latent mask (grey with ``mask_round`` off), ``D`` the network's own x0 read from a hook on the U-Net;
  an inpainting model's mask input and masked image are A1111's ``inpainting_image_conditioning`` (grey with
  ``mask_round`` off; from ``mask``, never ``latent_mask``);
* the A1111 route: ``mask_round: false`` keeps an RGBA mask's alpha grey and hands the pipeline the grey latent
  mask; ``latent_mask`` is decoded and used as A1111's ``init`` uses it (first channel of the RGB image for the
  latent mask, its grey levels for "fill", neither blurred, fitted nor cut);
* each image differs from the rounded / ``mask``-only case (the field is not ignored); bad values are one line.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webuiapi
from PIL import Image

from _a1111_masks import create_binary_mask, doubled, fill, mask_blur, overlay
from _a1111_masks import latent_mask as latmask
from _emoji_models import make_tiny_emoji_folder
from _live_server import live_server, server_config, shared_loader
from _pipeline_models import picture
from sdengine.io.resize import resize_image
from sdengine.pipeline import GenerationError, load_pipeline
from sdengine.pipeline.request import GenerationRequest

FAST = {"steps": 3, "sampler": "euler", "schedule": "normal", "cfg_scale": 1.0, "seed": 7, "progress": False}
PROMPT = "a red apple"


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return load_pipeline(tiny_sd1_folder, device="cpu")


def bands(size: int) -> Image.Image:
    """Four columns: 0, 90, 170 and 255 (grey levels that round apart from their grey)."""
    x = np.mgrid[0:size, 0:size][1]
    levels = np.select([x < size // 4, x < size // 2, x < 3 * size // 4], [0, 90, 170], 255)
    return Image.fromarray(levels.astype(np.uint8), "L")


def other_mask(w: int, h: int) -> Image.Image:
    """A latent mask unlike :func:`bands`: a grey disc (200) on a 60 ground, at its own size."""
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(w, h) / 3) ** 2
    return Image.fromarray(np.where(disc, 200, 60).astype(np.uint8), "L")


def run_with_x0s(pipe, **kw):
    """The result, each step's (sigma, blended x0) from the callback and each U-Net call's (input, eps)."""
    seen: list = []
    calls: list = []

    def hook(_m, args, out):
        calls.append((args[0].detach().clone(), (out if torch.is_tensor(out) else out[0]).detach().clone()))

    handle = pipe.unet.register_forward_hook(hook)
    try:
        r = pipe(PROMPT, **FAST, **kw, callback=lambda i: seen.append((i.sigma, i.denoised.clone())))
    finally:
        handle.remove()
    return r, seen, calls


def init_latent(pipe, init: Image.Image, mask: Image.Image) -> torch.Tensor:
    """The row's init latent (the pipeline's first draw from seed 7; the same whatever the masks)."""
    from sdengine.pipeline.latents import start_latents

    s = pipe.default_size
    start = start_latents(
        pipe.vae, generators=[torch.Generator("cpu").manual_seed(FAST["seed"])],
        latent_channels=pipe.latent_channels, width=s, height=s, scale_factor=pipe.vae_scale_factor, init=init,
        mask=np.asarray(mask, dtype=np.float32) / 255.0, mask_blur=0.0, strength=0.75, nine_channels=pipe.inpainting,
        tiled=None, device=torch.device("cpu"), pure_noise_at_full_strength=False,
    )  # fmt: skip
    assert start.init_latent is not None
    return start.init_latent


def assert_a1111_blend(pipe, result, seen, calls, init: torch.Tensor, nmask: np.ndarray, request: dict) -> None:
    """Euler's calls (cfg 1: one U-Net call a step, eps prediction): x = input * sqrt(sigma^2 + 1), the network's
    x0 ``D = x - sigma eps``; A1111's blended x0 ``D * nmask + init * (1 - nmask)`` each step, and the image the
    decode of its final blend ``x0_last * nmask + init * (1 - nmask)``."""
    m = torch.from_numpy(nmask.astype(np.float32))
    assert len(seen) == len(calls) == 3
    for (sigma, x0), (inp, eps) in zip(seen, calls, strict=True):
        x = inp[:, :4] * (sigma**2 + 1) ** 0.5
        want = (x - sigma * eps) * m + init * (1 - m)
        np.testing.assert_allclose(x0.numpy(), want.numpy(), atol=1e-5)
    final = seen[-1][1] * m + init * (1 - m)
    image = pipe.decode_latents(pipe.prepare(GenerationRequest(PROMPT, **FAST, **request)), final)
    np.testing.assert_allclose(result.arrays[0], image[0].permute(1, 2, 0).numpy(), atol=1e-6)


def test_mask_round_off_blends_by_the_grey_latent_mask_as_a1111(sd1) -> None:
    s, f = sd1.default_size, sd1.vae_scale_factor
    init, mask = picture(s, s), bands(s)
    kw = {"init_image": init, "mask": mask, "strength": 0.75, "strength_rule": "a1111"}
    grey = latmask(mask, s // f, s // f, round=False)
    assert len(np.unique(grey)) > 4  # grey, not 0 / 1
    r, seen, calls = run_with_x0s(sd1, **kw, mask_round=False)
    assert_a1111_blend(sd1, r, seen, calls, init_latent(sd1, init, mask), grey, {**kw, "mask_round": False})
    rounded = sd1(PROMPT, **FAST, **kw)
    assert np.abs(rounded.arrays - r.arrays).max() > 1e-2  # the field is not ignored


def test_latent_mask_makes_the_latent_mask_and_mask_the_model_input(sd1, tiny_inpaint_folder) -> None:
    """A1111's ``latent_mask`` (of another size than the image: shrunk straight to the latent): the blend's mask is
    its ``latmask``, rounded, or grey with ``mask_round`` off; an inpainting model's mask input stays the
    ``mask``'s (A1111 conditions on ``image_mask``)."""
    s, f = sd1.default_size, sd1.vae_scale_factor
    init, mask, lat = picture(s, s), bands(s), other_mask(3 * s // 2, s)
    kw = {"init_image": init, "mask": mask, "strength": 0.75, "strength_rule": "a1111", "latent_mask": lat}
    start = init_latent(sd1, init, mask)
    for rnd in (True, False):
        r, seen, calls = run_with_x0s(sd1, **kw, mask_round=rnd)
        want = latmask(lat, s // f, s // f, round=rnd)
        assert_a1111_blend(sd1, r, seen, calls, start, want, {**kw, "mask_round": rnd})
    plain = sd1(PROMPT, **FAST, **{k: v for k, v in kw.items() if k != "latent_mask"})
    assert np.abs(plain.arrays - r.arrays).max() > 1e-2
    # an inpainting model: the blend by the latent mask, its mask channel the mask's (rounded, nearest)
    pipe = load_pipeline(tiny_inpaint_folder, device="cpu")
    r, seen, calls = run_with_x0s(pipe, **kw)
    assert_a1111_blend(pipe, r, seen, calls, init_latent(pipe, init, mask), latmask(lat, s // f, s // f), kw)
    binary = torch.from_numpy(np.around(np.asarray(mask, np.float32) / 255))[None, None]
    for inp, _ in calls:
        np.testing.assert_array_equal(inp[:, 4:5].numpy(), F.interpolate(binary, size=(s // f, s // f)).numpy())


def test_mask_round_off_leaves_an_inpainting_models_mask_input_grey_as_a1111(tiny_inpaint_folder) -> None:
    """A1111's ``inpainting_image_conditioning`` with ``round_image_mask`` False (:func:`grey_conditioning`) in
    every call's input, the blend by the grey latent mask, another image than the rounded one."""
    pipe = load_pipeline(tiny_inpaint_folder, device="cpu")
    s, f = pipe.default_size, pipe.vae_scale_factor
    init, mask = picture(s, s), bands(s)
    kw = {"init_image": init, "mask": mask, "strength": 0.75, "strength_rule": "a1111"}
    r, seen, calls = run_with_x0s(pipe, **kw, mask_round=False)
    want = grey_conditioning(pipe, init, mask)
    assert len(np.unique(want[:, 0].numpy())) == 4
    for inp, _ in calls:
        np.testing.assert_allclose(inp[:, 4:].numpy(), want.numpy(), atol=1e-5)
    grey = latmask(mask, s // f, s // f, round=False)
    assert_a1111_blend(pipe, r, seen, calls, init_latent(pipe, init, mask), grey, {**kw, "mask_round": False})
    rounded = pipe(PROMPT, **FAST, **kw)
    assert np.abs(rounded.arrays - r.arrays).max() > 1e-2


def grey_conditioning(pipe, init: Image.Image, mask: Image.Image) -> torch.Tensor:
    """A1111's inpainting conditioning with ``round_image_mask`` False: the grey mask shrunk nearest, the masked
    image ``image * (1 - mask)`` (its lerp at ``inpainting_mask_weight`` 1) encoded with the row's third draw
    (init posterior, noise, masked posterior; seed 7)."""
    from sdengine import vae_utils
    from sdengine.io.images import image_tensor

    s, f = pipe.default_size, pipe.vae_scale_factor
    m = torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None]
    g = torch.Generator("cpu").manual_seed(FAST["seed"])
    post = vae_utils.encode_moments(pipe.vae, image_tensor(init), tiled=None)
    torch.randn(post.mean.shape, generator=g)  # the init posterior's draw
    torch.randn((1, pipe.latent_channels, s // f, s // f), generator=g)  # the noise
    masked = vae_utils.encode_moments(pipe.vae, image_tensor(init) * (1 - m), tiled=None)
    eps = torch.randn(masked.mean.shape, generator=g)
    latent = pipe.vae.scale_latents(masked.mean + masked.std * eps)
    return torch.cat([F.interpolate(m, size=(s // f, s // f)), latent], 1)


def test_soft_inpainting_blends_by_the_latent_mask_and_runs_on_inpainting_models(
    sd1, tiny_inpaint_folder, monkeypatch
) -> None:
    """A1111's soft inpainting reads ``nmask``, so a ``latent_mask``'s (grey: the script turns ``mask_round`` off);
    on an inpainting model (once refused) its mask input is the grey conditioning, as A1111's."""
    import sdengine.pipeline.core as core

    masks: list = []

    class Recorded(core.SoftInpaintBlend):
        def __init__(self, inner, init, mask, settings, **kw) -> None:
            masks.append(mask.clone())
            super().__init__(inner, init, mask, settings, **kw)

    monkeypatch.setattr(core, "SoftInpaintBlend", Recorded)
    s, f = sd1.default_size, sd1.vae_scale_factor
    init, mask, lat = picture(s, s), bands(s), other_mask(s, s)
    kw = {"init_image": init, "mask": mask, "strength": 0.75, "soft_inpainting": True, "strength_rule": "a1111"}
    with_lat = sd1(PROMPT, **FAST, **kw, latent_mask=lat)
    np.testing.assert_array_equal(masks[-1][0, 0].numpy(), latmask(lat, s // f, s // f, round=False))
    without = sd1(PROMPT, **FAST, **kw)
    np.testing.assert_array_equal(masks[-1][0, 0].numpy(), latmask(mask, s // f, s // f, round=False))
    assert np.abs(with_lat.arrays - without.arrays).max() > 1e-2
    pipe = load_pipeline(tiny_inpaint_folder, device="cpu")
    r, _, calls = run_with_x0s(pipe, **kw)
    want = grey_conditioning(pipe, init, mask)
    assert len(calls) == 3
    for inp, _ in calls:
        np.testing.assert_allclose(inp[:, 4:].numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(masks[-1][0, 0].numpy(), latmask(mask, s // f, s // f, round=False))
    assert r.composite_masks is not None and len(r.composite_masks) == 1
    plain = pipe(PROMPT, **FAST, **{k: v for k, v in kw.items() if k != "soft_inpainting"})
    assert np.abs(plain.arrays - r.arrays).max() > 1e-2


def test_bad_mask_round_and_latent_mask_are_one_line(sd1) -> None:
    from sdengine.pipeline.flux_fill import FILL, request_refusal

    s = sd1.default_size
    init, mask = picture(s, s), bands(s)
    base = {"init_image": init, "mask": mask, "strength_rule": "a1111"}
    cases = [
        ({**base, "mask_round": "no"}, "mask_round must be true or false, got 'no'"),
        ({"init_image": init, "mask_round": False}, "mask_round false needs a mask (inpainting"),
        ({"init_image": init, "latent_mask": mask}, "latent_mask needs a mask (inpainting"),
        ({**base, "strength_rule": "diffusers", "latent_mask": mask}, "latent_mask is A1111's"),
        ({**base, "strength_rule": "diffusers", "mask_round": False}, "mask_round false is A1111's"),
        ({**base, "latent_mask": "/nonexistent/lm.png"}, "latent mask not found: /nonexistent/lm.png"),
    ]
    for kw, says in cases:
        with pytest.raises(GenerationError) as e:
            sd1(PROMPT, **FAST, **kw)
        assert str(e.value).startswith(says) and "\n" not in str(e.value), str(e.value)
    for kw in ({"mask_round": False}, {"latent_mask": mask}):
        said = request_refusal(FILL, GenerationRequest(PROMPT, **base, **kw))
        assert said is not None and said.startswith("mask_round false / latent_mask: FLUX.1 Fill")


# ------------------------------------------------------------------------------------------------ the A1111 route

COMMON = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
SAMPLER = {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("a1111maskround")
    make_tiny_emoji_folder(tmp / "models" / "tiny")
    with live_server(server_config(tmp, models_dir=tmp / "models")) as s:
        yield s


def b64(image: Image.Image) -> str:
    return webuiapi.raw_b64_img(image)


def route_init() -> Image.Image:
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(
        np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)], -1)
    )


def route_mask() -> Image.Image:
    a = np.zeros((64, 64), np.uint8)
    a[12:52, 8:24], a[12:52, 24:40], a[12:52, 40:56] = 100, 200, 255
    return Image.fromarray(a, "L")


def img2img(server, **fields) -> tuple[np.ndarray, dict]:
    body = {"init_images": [b64(route_init())], "prompt": "a blue ball", "seed": 3, "denoising_strength": 0.8}
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json={**body, **SAMPLER, **COMMON, **fields}, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(got["images"][0])))
    return np.asarray(image.convert("RGB")), got


def pipeline(init: Image.Image, mask: Image.Image, **kw) -> np.ndarray:
    """The Python API on what A1111 hands its sampler (the blurred, fitted mask), A1111's step count."""
    image = shared_loader("emoji", "cpu")(
        "a blue ball", seed=3, init_image=init, mask=mask, mask_blur=0, strength=0.8, strength_rule="a1111",
        sampler="dpmpp_2m", schedule="karras", progress=False, **COMMON, **kw,
    ).images[0]  # fmt: skip
    return image


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_route_mask_round_false_keeps_the_alpha_and_the_latent_mask_grey(api) -> None:
    """An RGBA mask whose alpha is 100 / 200 / 255: A1111's ``create_binary_mask(round=False)`` keeps the alpha
    grey (rounded, the 100 part is cut at 128), the overlay is made from it, the pipeline's latent mask is left
    grey (``mask_round`` False, the pipeline test above)."""
    init = route_init()
    alpha = np.asarray(route_mask())
    rgba = Image.fromarray(np.dstack([np.full((64, 64, 3), 255, np.uint8), alpha]), "RGBA")
    got, answer = img2img(api, mask=b64(rgba), mask_round=False, inpainting_fill=1, mask_blur=2)
    blurred = mask_blur(create_binary_mask(rgba, round=False), 2, 2)
    want = overlay(pipeline(init, blurred, mask_round=False), init, doubled(blurred))
    np.testing.assert_array_equal(got, arr(want))
    assert "mask_round" not in answer["info"]
    rounded, _ = img2img(api, mask=b64(rgba), inpainting_fill=1, mask_blur=2)
    hard = mask_blur(create_binary_mask(rgba), 2, 2)
    np.testing.assert_array_equal(rounded, arr(overlay(pipeline(init, hard), init, doubled(hard))))
    assert (np.abs(got.astype(int) - rounded).max(-1) > 0).mean() > 0.2
    # an L mask: only the latent mask is left grey (A1111 keeps such a mask grey anyway): another image still
    mask = route_mask()
    grey, _ = img2img(api, mask=b64(mask), mask_round=False, inpainting_fill=1, mask_blur=0)
    want = overlay(pipeline(init, mask, mask_round=False), init, doubled(mask))
    np.testing.assert_array_equal(grey, arr(want))
    plain, _ = img2img(api, mask=b64(mask), inpainting_fill=1, mask_blur=0)
    assert not np.array_equal(grey, plain)


def test_route_latent_mask_as_a1111(api) -> None:
    """``latent_mask`` (RGB, its red channel not its grey): the latent mask from its first channel (A1111's
    ``latmask``), "fill" under its grey levels, the overlay still the blurred ``mask``'s; in "Only masked" uncut."""
    init, mask = route_init(), route_mask()
    yy, xx = np.mgrid[0:64, 0:64]
    red = np.where((xx > 20) & (xx < 60) & (yy > 4), 230, 20).astype(np.uint8)
    lm = Image.fromarray(np.dstack([red, np.full_like(red, 250), red[::-1]]), "RGB")
    first = Image.fromarray(np.asarray(lm)[..., 0], "L")  # A1111's latmask reads the RGB image's first channel
    blurred = mask_blur(create_binary_mask(mask), 4, 4)
    got, answer = img2img(api, mask=b64(mask), latent_mask=b64(lm), inpainting_fill=0, mask_blur=4)
    assert answer["info"].count("latent_mask") == 0
    want = overlay(pipeline(fill(init, lm), blurred, latent_mask=first), init, doubled(blurred))
    np.testing.assert_array_equal(got, arr(want))
    without, _ = img2img(api, mask=b64(mask), inpainting_fill=0, mask_blur=4)
    assert (np.abs(got.astype(int) - without).max(-1) > 0).mean() > 0.05
    # "original" (no fill): the latent mask alone makes the difference
    kept, _ = img2img(api, mask=b64(mask), latent_mask=b64(lm), inpainting_fill=1, mask_blur=4)
    want = overlay(pipeline(init, blurred, latent_mask=first), init, doubled(blurred))
    np.testing.assert_array_equal(kept, arr(want))
    unkept, _ = img2img(api, mask=b64(mask), inpainting_fill=1, mask_blur=4)
    assert (np.abs(kept.astype(int) - unkept).max(-1) > 0).mean() > 0.05
    # mask_round false too: the first channel left grey
    grey, _ = img2img(api, mask=b64(mask), latent_mask=b64(lm), inpainting_fill=1, mask_blur=4, mask_round=False)
    want = overlay(pipeline(init, blurred, latent_mask=first, mask_round=False), init, doubled(blurred))
    np.testing.assert_array_equal(grey, arr(want))
    assert not np.array_equal(grey, kept)
    # "Only masked": the box from the blurred mask, the latent mask whole (A1111 cuts only image_mask)
    box_mask = np.zeros((64, 64), np.uint8)
    box_mask[20:40, 20:40] = 255
    bm = Image.fromarray(box_mask, "L")
    only, _ = img2img(api, mask=b64(bm), latent_mask=b64(lm), inpainting_fill=1, mask_blur=2, inpaint_full_res=True,
                      inpaint_full_res_padding=0)  # fmt: skip
    soft = mask_blur(bm, 2, 2)
    box = soft.getbbox()
    assert box is not None
    cut = resize_image(init.crop(box), 64, 64, "resize and fill")
    cut_mask = resize_image(soft.crop(box), 64, 64, "resize and fill")
    canvas = Image.new("RGBA", init.size)
    back = resize_image(pipeline(cut, cut_mask, latent_mask=first), box[2] - box[0], box[3] - box[1], "crop and resize")
    canvas.paste(back, box[:2])
    np.testing.assert_array_equal(only, arr(overlay(canvas, init, soft)))


def test_route_bad_latent_mask_and_mask_round_are_one_line(api) -> None:
    body = {"init_images": [b64(route_init())], "mask": b64(route_mask()), "prompt": "a", **COMMON}
    small = b64(Image.new("L", (32, 32), 255))
    cases = [
        ({"latent_mask": small, "inpainting_fill": 0}, 400, "latent_mask is 32x32: A1111 fills the image under it"),
        ({"latent_mask": 5}, 422, "latent_mask 5: A1111's latent_mask is an image"),
        ({"latent_mask": "bm90IGFuIGltYWdl"}, 400, "latent_mask: not a PNG, JPEG or WebP image"),
        ({"mask_round": "no"}, 422, "mask_round 'no': A1111's mask_round is true"),
    ]
    for extra, status, says in cases:
        r = httpx.post(f"{api.url}/sdapi/v1/img2img", json={**body, **extra}, timeout=60)
        detail = r.json()["detail"]
        assert r.status_code == status and detail.startswith(says) and "\n" not in detail, r.text
    # "original" takes a latent mask of any size (A1111 shrinks it straight to the latent)
    r = httpx.post(f"{api.url}/sdapi/v1/img2img", json={**body, "latent_mask": small, "inpainting_fill": 1}, timeout=60)
    assert r.status_code == 200, r.text
