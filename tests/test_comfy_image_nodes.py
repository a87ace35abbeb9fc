"""ComfyUI's image, mask and latent utility nodes (nodes_image.py, nodes_latent.py) against independent
re-derivations of ComfyUI's formulas (float64 numpy, PIL), and end to end through the ComfyUI HTTP API."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _comfy_live import live_client, run_prompt, view_image
from _live_server import server_config
from sdengine.latent_sampling import make_noise
from sdengine.server.comfy import nodes_image as ni
from sdengine.server.comfy import nodes_latent as nl
from sdengine.server.comfy.nodes import NodeError, RunContext, latent_from_batch

CTX = RunContext(pipeline=lambda ref: None, catalog=None, folders=None)  # type: ignore[arg-type]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# ------------------------------------------------------------------------------------------- image filters


def _blend_ref(a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return np.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":  # the W3C soft light with its D(x) for the light half
        d = np.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, np.sqrt(a))
        return np.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (d - a))
    assert mode == "difference"
    return a - b


@pytest.mark.parametrize("mode", ni.BLEND_MODES)
def test_image_blend_modes_follow_the_formulas(mode):
    a, b = rand(2, 6, 7, 3, seed=1), rand(2, 6, 7, 3, seed=2)
    (out,) = ni.image_blend(CTX, a, b, 0.3, mode)
    want = np.clip(f64(a) * 0.7 + _blend_ref(f64(a), f64(b), mode) * 0.3, 0, 1)
    np.testing.assert_allclose(out.numpy(), want, atol=2e-6)


def test_image_blend_fits_image2_and_refuses_mismatched_batches():
    a = rand(1, 8, 8, 3, seed=3)
    wide = rand(1, 8, 12, 3, seed=4)  # its centre 8 x 8 (columns 2 .. 9) has image1's aspect: no resampling left
    (out,) = ni.image_blend(CTX, a, wide, 1.0, "normal")
    np.testing.assert_allclose(out.numpy(), np.clip(f64(wide)[:, :, 2:10], 0, 1), atol=1e-6)
    (one_row,) = ni.image_blend(CTX, rand(3, 4, 4, 3), rand(1, 4, 4, 3, seed=5), 0.5, "multiply")
    assert one_row.shape == (3, 4, 4, 3)
    with pytest.raises(NodeError, match="image1 has 2 rows and image2 3"):
        ni.image_blend(CTX, rand(2, 4, 4, 3), rand(3, 4, 4, 3), 0.5, "normal")


def _conv_reflect(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """float64 correlation of each channel with ``k`` over the image mirrored (numpy's reflect) at its edges."""
    r = k.shape[0] // 2
    p = np.pad(img, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros_like(img)
    h, w = img.shape[1:3]
    for dy in range(k.shape[0]):
        for dx in range(k.shape[1]):
            out += k[dy, dx] * p[:, dy : dy + h, dx : dx + w]
    return out


def _gauss_ref(size: int, sigma: float) -> np.ndarray:
    t = np.linspace(-1, 1, size)
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


@pytest.mark.parametrize(("radius", "sigma"), [(1, 1.0), (3, 0.4), (5, 2.5)])
def test_image_blur_and_sharpen_are_comfyuis_kernels_over_the_mirrored_image(radius, sigma):
    img = rand(2, 11, 13, 3, seed=radius)
    (blur,) = ni.image_blur(CTX, img, radius, sigma)
    np.testing.assert_allclose(blur.numpy(), _conv_reflect(f64(img), _gauss_ref(2 * radius + 1, sigma)), atol=1e-5)
    alpha = 0.7
    k = -10 * alpha * _gauss_ref(2 * radius + 1, sigma)
    k[radius, radius] += 1 - k.sum()  # the kernel sums to 1: image + 10 alpha (image - blur)
    (sharp,) = ni.image_sharpen(CTX, img, radius, sigma, alpha)
    np.testing.assert_allclose(sharp.numpy(), np.clip(_conv_reflect(f64(img), k), 0, 1), atol=2e-5)
    # a flat image stays flat under both (the kernels sum to 1)
    flat = torch.full((1, 9, 9, 3), 0.25)
    assert torch.allclose(ni.image_blur(CTX, flat, radius, sigma)[0], flat, atol=1e-6)
    assert torch.allclose(ni.image_sharpen(CTX, flat, radius, sigma, 2.0)[0], flat, atol=1e-5)


def test_a_blur_wider_than_the_image_is_refused_in_one_line():
    with pytest.raises(NodeError, match="radius of 5 needs an image larger than 5 pixels") as e:
        ni.image_blur(CTX, rand(1, 4, 40, 3), 5, 1.0)
    assert "\n" not in str(e.value)


def test_image_quantize_maps_onto_a_palette_of_the_given_size():
    img = rand(1, 16, 16, 3, seed=7)
    for dither in ("none", "floyd-steinberg", "bayer-4"):
        (q,) = ni.image_quantize(CTX, img, 5, dither)
        colours = np.unique((q[0].numpy() * 255).round().reshape(-1, 3), axis=0)
        assert 1 <= len(colours) <= 5, (dither, len(colours))
    # no dither: each pixel is the palette colour nearest its 8-bit value (truncated: x * 255 -> uint8); PIL's
    # palette lookup (a colour-cube cache) is approximate: a few pixels get a colour a few levels further
    (q,) = ni.image_quantize(CTX, img, 5, "none")
    palette = np.unique((q[0].numpy() * 255).round().reshape(-1, 3), axis=0)
    src = np.floor(img[0].double().numpy() * 255).reshape(-1, 1, 3)
    d = ((src - palette[None]) ** 2).sum(-1)
    got = ((q[0].numpy() * 255).round().reshape(-1, 1, 3) == palette[None]).all(-1).argmax(1)
    chosen, nearest = np.sqrt(d[np.arange(len(got)), got]), np.sqrt(d.min(1))
    assert (chosen <= nearest + 4).all() and (chosen <= nearest + 1e-9).mean() > 0.95
    # 4 colours asked of a 4-colour image: the image as it was (at its truncated 8-bit values)
    four = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.1, 0.4], [0.5, 0.5, 0.999], [0.0, 1.0, 0.0]])[torch.arange(64) % 4]
    four = four.reshape(1, 8, 8, 3)
    (same,) = ni.image_quantize(CTX, four, 4, "floyd-steinberg")
    np.testing.assert_array_equal((same.numpy() * 255).round(), np.floor(f64(four) * 255))
    # Floyd-Steinberg keeps a grey's mean that two colours cannot hold; no dither does not
    grey = torch.cat([torch.zeros(1, 32, 8, 3), torch.full((1, 32, 48, 3), 0.3), torch.ones(1, 32, 8, 3)], 2)
    (fs,) = ni.image_quantize(CTX, grey, 2, "floyd-steinberg")
    (plain,) = ni.image_quantize(CTX, grey, 2, "none")
    mid = (slice(None), slice(4, 28), slice(12, 52))
    assert abs(float(fs[mid].mean()) - 0.3) < 0.05 < abs(float(plain[mid].mean()) - 0.3)


def test_bayer_matrices_are_the_classic_ones_centred():
    b4 = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]], dtype=np.float64)
    np.testing.assert_allclose(ni.bayer_matrix(4), (b4 - 7.5) / 16)
    np.testing.assert_allclose(ni.bayer_matrix(2), (np.array([[0, 2], [3, 1]]) - 1.5) / 4)
    assert ni.bayer_matrix(16).shape == (16, 16) and abs(ni.bayer_matrix(16).mean()) < 1e-12


def test_image_scale_to_total_pixels_sizes_and_the_side_limit():
    img = rand(1, 32, 64, 3, seed=9)
    total = 0.01 * 1024 * 1024
    s = math.sqrt(total / (64 * 32))
    for steps, size in ((1, (round(64 * s), round(32 * s))), (8, (round(64 * s / 8) * 8, round(32 * s / 8) * 8))):
        (out,) = ni.image_scale_to_total_pixels(CTX, img, "bilinear", 0.01, steps)
        assert (out.shape[2], out.shape[1]) == size == ((145, 72) if steps == 1 else (144, 72))
    want = torch.nn.functional.interpolate(img.movedim(-1, 1), size=(72, 144), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out.numpy(), want.movedim(1, -1).clamp(0, 1).numpy(), atol=1e-6)
    with pytest.raises(NodeError, match="over the server's limit of 2048"):
        ni.image_scale_to_total_pixels(CTX, img, "bilinear", 16.0, 1)
    # an RGBA image keeps its alpha on every method, PIL's Lanczos too
    rgba = torch.cat([img, torch.full((1, 32, 64, 1), 0.6)], -1)
    for method in ni.TOTAL_PIXELS_METHODS:
        (out,) = ni.image_scale_to_total_pixels(CTX, rgba, method, 0.01, 8)
        assert out.shape == (1, 72, 144, 4) and torch.allclose(out[..., 3], torch.tensor(0.6), atol=1 / 255), method


# ------------------------------------------------------------------------------------- transforms, batches


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray((img.numpy() * 255).round().astype(np.uint8))


def test_image_flip_and_rotate_as_pils_transposes():
    img = rand(2, 5, 7, 3, seed=11)
    ops = {
        ("flip", "x-axis: vertically"): Image.Transpose.FLIP_TOP_BOTTOM,
        ("flip", "y-axis: horizontally"): Image.Transpose.FLIP_LEFT_RIGHT,
        ("rotate", "90 degrees"): Image.Transpose.ROTATE_270,  # PIL turns counter-clockwise; ComfyUI clockwise
        ("rotate", "180 degrees"): Image.Transpose.ROTATE_180,
        ("rotate", "270 degrees"): Image.Transpose.ROTATE_90,
    }
    for (kind, how), op in ops.items():
        (out,) = (ni.image_flip if kind == "flip" else ni.image_rotate)(CTX, img, how)
        for i in range(2):
            assert np.array_equal(np.asarray(_pil(out[i])), np.asarray(_pil(img[i]).transpose(op))), how
    assert torch.equal(ni.image_rotate(CTX, img, "none")[0], img)


def test_repeat_and_pick_image_batches():
    img = rand(3, 4, 4, 3, seed=12)
    (rep,) = ni.repeat_image_batch(CTX, img, 2)
    assert torch.equal(rep, torch.cat([img, img]))
    with pytest.raises(NodeError, match="batch_size 9 is over the server's limit of 8"):
        ni.repeat_image_batch(CTX, img, 3)
    for index, length, rows in ((1, 5, [1, 2]), (-1, 1, [2]), (-7, 2, [0, 1]), (9, 3, [2])):
        (out,) = ni.image_from_batch(CTX, img, index, length)
        assert torch.equal(out, img[rows]), (index, length)


def test_split_and_join_alpha():
    rgba = rand(2, 4, 4, 4, seed=13)
    colour, mask = ni.split_image_with_alpha(CTX, rgba)
    assert torch.equal(colour, rgba[..., :3]) and torch.allclose(mask, 1 - rgba[..., 3])
    (joined,) = ni.join_image_with_alpha(CTX, colour, mask)
    assert torch.allclose(joined, rgba, atol=1e-7)
    _, none = ni.split_image_with_alpha(CTX, colour)
    assert torch.equal(none, torch.zeros(2, 4, 4))
    # a 1 x 2 mask on a 2 x 4 image: bilinear, half-pixel centred, edges clamped: alpha 1, .75, .25, 0 per row
    (big,) = ni.join_image_with_alpha(CTX, torch.zeros(3, 2, 4, 3), torch.tensor([[[0.0, 1.0]]]))
    np.testing.assert_allclose(big[..., 3].numpy(), np.broadcast_to([1, 0.75, 0.25, 0], (3, 2, 4)), atol=1e-7)
    with pytest.raises(NodeError, match="image has 2 rows and alpha 3"):
        ni.join_image_with_alpha(CTX, colour, torch.zeros(3, 4, 4))


def _porter_duff_ref(s: np.ndarray, sa: np.ndarray, d: np.ndarray, da: np.ndarray, mode: str):
    """ComfyUI's operators on premultiplied colours (its DARKEN / LIGHTEN add the min / max to the two
    uncovered parts; its OVERLAY compares twice the destination with its alpha), float64."""
    ps, pd = s * sa, d * da
    u = sa + da - sa * da
    table = {
        "ADD": (np.clip(sa + da, 0, 1), np.clip(ps + pd, 0, 1)),
        "CLEAR": (0 * da, 0 * pd),
        "DARKEN": (u, (1 - da) * ps + (1 - sa) * pd + np.minimum(ps, pd)),
        "DST": (da, pd),
        "DST_ATOP": (sa, sa * pd + (1 - da) * ps),
        "DST_IN": (sa * da, pd * sa),
        "DST_OUT": ((1 - sa) * da, (1 - sa) * pd),
        "DST_OVER": (da + (1 - da) * sa, pd + (1 - da) * ps),
        "LIGHTEN": (u, (1 - da) * ps + (1 - sa) * pd + np.maximum(ps, pd)),
        "MULTIPLY": (sa * da, ps * pd),
        "OVERLAY": (u, np.where(2 * pd < da, 2 * ps * pd, sa * da - 2 * (da - ps) * (sa - pd))),
        "SCREEN": (u, ps + pd - ps * pd),
        "SRC": (sa, ps),
        "SRC_ATOP": (da, da * ps + (1 - sa) * pd),
        "SRC_IN": (sa * da, ps * da),
        "SRC_OUT": ((1 - da) * sa, (1 - da) * ps),
        "SRC_OVER": (sa + (1 - sa) * da, ps + (1 - sa) * pd),
        "XOR": ((1 - da) * sa + (1 - sa) * da, (1 - da) * ps + (1 - sa) * pd),
    }
    a, c = table[mode]
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(a > 1e-5, c / a, 0.0)
    return np.clip(c, 0, 1), 1 - a


@pytest.mark.parametrize("mode", ni.PORTER_DUFF_MODES)
def test_porter_duff_modes(mode):
    s, d = rand(2, 5, 6, 3, seed=21), rand(2, 5, 6, 3, seed=22)
    sm, dm = rand(2, 5, 6, seed=23), rand(2, 5, 6, seed=24)
    image, mask = ni.porter_duff_image_composite(CTX, s, sm, d, dm, mode)
    want_c, want_m = _porter_duff_ref(f64(s), 1 - f64(sm)[..., None], f64(d), 1 - f64(dm)[..., None], mode)
    np.testing.assert_allclose(image.numpy(), want_c, atol=1e-5)
    np.testing.assert_allclose(mask.numpy(), want_m[..., 0], atol=1e-6)


def test_porter_duff_source_over_equals_pils_alpha_composite_and_fits_batches():
    s, d = rand(1, 8, 8, 3, seed=31), rand(1, 8, 8, 3, seed=32)
    sa, da = rand(1, 8, 8, seed=33), rand(1, 8, 8, seed=34)
    q = [torch.round(t * 255) / 255 for t in (s, sa, d, da)]  # on PIL's 8-bit grid
    image, mask = ni.porter_duff_image_composite(CTX, q[0], 1 - q[1], q[2], 1 - q[3], "SRC_OVER")

    def rgba(c, a):
        return Image.fromarray((torch.cat([c[0], a[0][..., None]], -1).numpy() * 255).round().astype(np.uint8))

    pil = np.asarray(Image.alpha_composite(rgba(q[2], q[3]), rgba(q[0], q[1])), np.float64) / 255
    assert np.abs(pil[..., 3] - (1 - mask[0].numpy())).max() <= 1 / 255 + 1e-6
    opaque = pil[..., 3] > 0.05  # PIL rounds the colour of nearly transparent pixels coarsely
    assert np.abs(pil[..., :3] - image[0].numpy())[opaque].max() <= 2 / 255
    (four, _) = ni.porter_duff_image_composite(CTX, rand(4, 8, 8, 3), sa, d, da, "SRC_OVER")
    assert four.shape == (4, 8, 8, 3)
    with pytest.raises(NodeError, match="source 2, source_alpha 1, destination 3"):
        ni.porter_duff_image_composite(CTX, rand(2, 8, 8, 3), sa, rand(3, 8, 8, 3), da, "XOR")
    with pytest.raises(NodeError, match="source has 4 channels and destination 3"):
        ni.porter_duff_image_composite(CTX, rand(1, 8, 8, 4), sa, d, da, "XOR")


# ------------------------------------------------------------------------------------------------ masks


def test_threshold_crop_and_colour_masks():
    m = rand(2, 6, 7, seed=41)
    (t,) = ni.threshold_mask(CTX, m, 0.4)
    assert torch.equal(t, (m > 0.4).float())
    (c,) = ni.crop_mask(CTX, m, 2, 1, 3, 10)
    assert torch.equal(c, m[:, 1:6, 2:5])
    with pytest.raises(NodeError, match="outside the 7x6 mask"):
        ni.crop_mask(CTX, m, 7, 0, 3, 3)
    img = torch.zeros(1, 2, 3, 3)
    img[0, 0, 0] = torch.tensor([0x12, 0x34, 0x56]) / 255.0
    img[0, 1, 2] = torch.tensor([0x12 + 0.49, 0x34 - 0.49, 0x56]) / 255.0  # rounds to the same colour
    img[0, 1, 1] = torch.tensor([0x12 + 0.51, 0x34, 0x56]) / 255.0  # rounds to 0x13
    (cm,) = ni.image_color_to_mask(CTX, img, 0x123456)
    assert cm.tolist() == [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
    (black,) = ni.image_color_to_mask(CTX, img, 0)
    assert float(black.sum()) == 3.0


# ---------------------------------------------------------------------------------------------- latents


def lat(z: torch.Tensor, f: int = 8, **extra) -> dict:
    return {"samples": z, "size": (z.shape[0], z.shape[2] * f, z.shape[3] * f), "posterior": None,
            "noise_mask": None, **extra}  # fmt: skip


def empty(b: int, h: int, w: int) -> dict:
    return {"samples": None, "size": (b, h, w), "posterior": None, "noise_mask": None}


def test_latent_add_subtract_multiply():
    a, b = rand(2, 4, 3, 5, seed=51), rand(2, 4, 3, 5, seed=52)
    assert torch.allclose(nl.latent_add(CTX, lat(a), lat(b))[0]["samples"], a + b)
    assert torch.allclose(nl.latent_subtract(CTX, lat(a), lat(b))[0]["samples"], a - b)
    assert torch.allclose(nl.latent_multiply(CTX, lat(a), -2.5)[0]["samples"], a * -2.5)
    # samples2's rows repeated or cut to samples1's batch (ComfyUI's repeat_to_batch_size)
    three = rand(3, 4, 3, 5, seed=53)
    assert torch.allclose(nl.latent_add(CTX, lat(a), lat(three))[0]["samples"], a + three[:2])
    assert torch.allclose(nl.latent_add(CTX, lat(three), lat(a))[0]["samples"], three + a[[0, 1, 0]])
    # another size is scaled to samples1's (a flat latent stays flat)
    (big,) = nl.latent_add(CTX, lat(a), lat(torch.full((2, 4, 6, 10), 0.5)))
    assert torch.allclose(big["samples"], a + 0.5)
    # empty latents: zeros in the other's channels; two empty ones stay empty
    (e,) = nl.latent_subtract(CTX, empty(2, 24, 40), lat(b))
    assert torch.allclose(e["samples"], -b) and e["size"] == (2, 24, 40)
    (ee,) = nl.latent_add(CTX, empty(1, 64, 64), empty(1, 64, 64))
    assert ee["samples"] is None and ee["size"] == (1, 64, 64)
    assert nl.latent_multiply(CTX, empty(1, 64, 64), 3.0)[0]["samples"] is None
    with pytest.raises(NodeError, match="4 and 16 channels"):
        nl.latent_add(CTX, lat(a), lat(rand(2, 16, 3, 5)))


def _slerp_ref(a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """ComfyUI's LatentInterpolate on one row (C, h, w), float64, as its formula reads for a batch of one."""
    m1, m2 = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    t = np.nan_to_num(a / m1) * r + np.nan_to_num(b / m2) * (1 - r)
    return np.nan_to_num(t / np.linalg.norm(t, axis=0)) * (m1 * r + m2 * (1 - r))


def test_latent_interpolate_and_blend():
    a, b = rand(2, 4, 3, 5, seed=61) - 0.5, rand(2, 4, 3, 5, seed=62) - 0.5
    (out,) = nl.latent_interpolate(CTX, lat(a), lat(b), 0.3)
    for i in range(2):  # each row with its own lengths
        np.testing.assert_allclose(out["samples"][i].numpy(), _slerp_ref(f64(a[i]), f64(b[i]), 0.3), atol=1e-5)
    assert torch.allclose(nl.latent_interpolate(CTX, lat(a), lat(b), 1.0)[0]["samples"], a, atol=1e-6)
    (blend,) = nl.latent_blend(CTX, lat(a), lat(b[:1]), 0.25)
    assert torch.allclose(blend["samples"], a * 0.25 + b[:1] * 0.75)
    with pytest.raises(NodeError, match="samples2 has 3 rows and samples1 2"):
        nl.latent_blend(CTX, lat(a), lat(rand(3, 4, 3, 5)), 0.5)


def _rows_drawn_one_by_one(seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's prepare_noise with batch indices: rows 0 .. n - 1 drawn one after the other from the seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn((1, *shape), generator=g) for _ in range(n)])


def test_latent_batch_and_seed_behavior_pick_the_noise_rows_as_comfyui():
    a, b = rand(2, 4, 3, 5, seed=71), rand(1, 4, 6, 10, seed=72)
    (both,) = nl.latent_batch(CTX, lat(a), lat(b))
    assert both["samples"].shape == (3, 4, 3, 5) and both["size"] == (3, 24, 40)
    assert torch.equal(both["samples"][:2], a) and both["batch_index"] == [0, 1, 0]
    # under ComfyUI's seed rule the batched latent's third row gets the first row's noise
    noise = make_noise((3, 4, 3, 5), 7, "comfyui", both["batch_index"])
    assert torch.equal(noise[2], noise[0]) and not torch.equal(noise[1], noise[0])
    assert torch.equal(noise[:2], _rows_drawn_one_by_one(7, 2, (4, 3, 5)))
    # fixed: every row the first row's noise; after LatentFromBatch its row of the original batch
    (fixed,) = nl.latent_batch_seed_behavior(CTX, lat(rand(3, 4, 3, 5)), "fixed")
    assert fixed["batch_index"] == [0, 0, 0]
    (picked,) = latent_from_batch(CTX, lat(rand(4, 4, 3, 5)), 2, 2)
    (fixed2,) = nl.latent_batch_seed_behavior(CTX, picked, "fixed")
    assert fixed2["batch_index"] == [2, 2]
    whole = _rows_drawn_one_by_one(5, 3, (4, 3, 5))
    rows = make_noise((2, 4, 3, 5), 5, "comfyui", fixed2["batch_index"])
    assert torch.equal(rows[0], whole[2]) and torch.equal(rows[1], whole[2])
    (rand_,) = nl.latent_batch_seed_behavior(CTX, fixed2, "random")
    assert "batch_index" not in rand_
    # two empty latents stay empty; the batch limit holds
    (ee,) = nl.latent_batch(CTX, empty(2, 64, 64), empty(1, 32, 32))
    assert ee["samples"] is None and ee["size"] == (3, 64, 64) and ee["batch_index"] == [0, 1, 0]
    with pytest.raises(NodeError, match="batch_size 9 is over the server's limit of 8"):
        nl.latent_batch(CTX, empty(5, 64, 64), empty(4, 64, 64))


def test_latent_flip_rotate_crop():
    z = rand(1, 4, 3, 5, seed=81)
    post = (z * 2, z * 3)
    mask = torch.ones(1, 1, 24, 40)
    base = lat(z, posterior=post, noise_mask=mask)
    (fx,) = nl.latent_flip(CTX, base, "x-axis: vertically")
    (fy,) = nl.latent_flip(CTX, base, "y-axis: horizontally")
    assert np.array_equal(fx["samples"].numpy(), f64(z)[:, :, ::-1].astype(np.float32))
    assert np.array_equal(fy["samples"].numpy(), f64(z)[:, :, :, ::-1].astype(np.float32))
    for k, how in enumerate(nl.ROTATIONS):
        (r,) = nl.latent_rotate(CTX, base, how)
        want = np.rot90(z.numpy(), k=-k, axes=(2, 3))  # numpy turns counter-clockwise for positive k
        assert np.array_equal(r["samples"].numpy(), want), how
        assert np.array_equal(r["posterior"][1].numpy(), np.rot90(post[1].numpy(), k=-k, axes=(2, 3)))
        assert r["size"] == ((1, 40, 24) if k % 2 else (1, 24, 40)) and r["noise_mask"] is mask
    assert nl.latent_rotate(CTX, empty(1, 32, 64), "90 degrees")[0]["size"] == (1, 64, 32)
    big = rand(1, 4, 16, 16, seed=82)
    # x = 200 is 25 latent pixels, held at 16 - 8 (64 pixels before the edge); 40 pixels wide is 5 latent pixels
    (c,) = nl.latent_crop(CTX, lat(big), 40, 64, 200, 16)
    assert torch.equal(c["samples"], big[:, :, 2:10, 8:13]) and c["size"] == (1, 64, 40)
    (ce,) = nl.latent_crop(CTX, empty(2, 128, 128), 64, 64, 0, 0)
    assert ce["samples"] is None and ce["size"] == (2, 64, 64)


# --------------------------------------------------------------------------------------- through the API


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_client(server_config(tmp_path_factory.mktemp("comfyimg"))) as (_, c):
        yield c


def test_a_workflow_chaining_the_new_nodes_equals_the_nodes_called_in_turn(client):
    rgba = (rand(1, 24, 32, 4, seed=91)[0].numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    r = client.post("/upload/image", files={"image": ("chain.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    name = r.json()["name"]
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 0.8}},
        "3": {"class_type": "ImageSharpen", "inputs": {"image": ["2", 0], "sharpen_radius": 1, "sigma": 1.0,
                                                       "alpha": 0.5}},
        "4": {"class_type": "ImageRotate", "inputs": {"image": ["3", 0], "rotation": "90 degrees"}},
        "5": {"class_type": "ImageFlip", "inputs": {"image": ["4", 0], "flip_method": "y-axis: horizontally"}},
        "6": {"class_type": "ImageBlend", "inputs": {"image1": ["5", 0], "image2": ["1", 0], "blend_factor": 0.4,
                                                     "blend_mode": "overlay"}},
        "7": {"class_type": "ImageQuantize", "inputs": {"image": ["6", 0], "colors": 16, "dither": "floyd-steinberg"}},
        "8": {"class_type": "ThresholdMask", "inputs": {"mask": ["1", 1], "value": 0.5}},
        "9": {"class_type": "CropMask", "inputs": {"mask": ["8", 0], "x": 4, "y": 2, "width": 24, "height": 20}},
        "10": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["7", 0], "alpha": ["9", 0]}},
        "11": {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": 3}},
        "12": {"class_type": "ImageFromBatch", "inputs": {"image": ["11", 0], "batch_index": -1, "length": 1}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "chain"}},
    }  # fmt: skip
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    got = view_image(client, h["outputs"]["13"]["images"][0])
    assert got.shape == (32, 24, 4)  # turned a quarter, RGBA
    # the same chain through the node functions
    img = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255)[None]
    mask = 1 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255)[None]
    x = ni.image_blur(CTX, img, 2, 0.8)[0]
    x = ni.image_sharpen(CTX, x, 1, 1.0, 0.5)[0]
    x = ni.image_flip(CTX, ni.image_rotate(CTX, x, "90 degrees")[0], "y-axis: horizontally")[0]
    x = ni.image_quantize(CTX, ni.image_blend(CTX, x, img, 0.4, "overlay")[0], 16, "floyd-steinberg")[0]
    m = ni.crop_mask(CTX, ni.threshold_mask(CTX, mask, 0.5)[0], 4, 2, 24, 20)[0]
    want = ni.join_image_with_alpha(CTX, x, m)[0][0]
    assert np.array_equal(got, (want.numpy() * 255).round().astype(np.uint8))


def test_latent_nodes_through_the_api_share_noise_as_comfyui(client):
    sample = {"seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "LatentBatch", "inputs": {"samples1": ["4", 0], "samples2": ["4", 0]}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], **sample}},
        "7": {"class_type": "LatentFlip", "inputs": {"samples": ["6", 0], "flip_method": "y-axis: horizontally"}},
        "8": {"class_type": "LatentMultiply", "inputs": {"samples": ["7", 0], "multiplier": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "latents"}},
    }  # fmt: skip
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    imgs = h["outputs"]["10"]["images"]
    assert len(imgs) == 2
    first, second = (view_image(client, im) for im in imgs)
    assert np.array_equal(first, second)  # LatentBatch's rows keep index 0: the same noise, the same image
    # "random" forgets the indices: the two rows draw different noise
    g["11"] = {"class_type": "LatentBatchSeedBehavior", "inputs": {"samples": ["5", 0], "seed_behavior": "random"}}
    g["6"]["inputs"]["latent_image"] = ["11", 0]
    h = run_prompt(client, g)
    a, b = (view_image(client, im) for im in h["outputs"]["10"]["images"])
    assert not np.array_equal(a, b)


def test_bad_inputs_give_comfyuis_errors(client):
    base = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 3, "color": 255}},
        "3": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["2", 0], "blend_factor": 0.5,
                                                     "blend_mode": "screen"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }  # fmt: skip
    for node, inputs, kind in (
        ("3", {"blend_factor": 1.5}, "value_bigger_than_max"),
        ("3", {"blend_mode": "dodge"}, "value_not_in_list"),
    ):
        g = {k: {**v, "inputs": dict(v["inputs"])} for k, v in base.items()}
        g[node]["inputs"].update(inputs)
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 400, r.text
        assert kind in [e["type"] for e in r.json()["node_errors"][node]["errors"]]
    g = {k: {**v, "inputs": dict(v["inputs"])} for k, v in base.items()}
    g["4"] = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 32, "sigma": 1.0}}
    g["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 400 and r.json()["node_errors"]["4"]["errors"][0]["type"] == "value_bigger_than_max"
    # mismatched batches fail when the node runs, in ComfyUI's execution_error naming the node
    h = run_prompt(client, base)
    assert h["status"]["status_str"] == "error"
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "3" and err["node_type"] == "ImageBlend"
    assert "image1 has 2 rows and image2 3" in err["exception_message"] and "\n" not in err["exception_message"]
    big = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["1", 0], "upscale_method": "area",
                                                                  "megapixels": 16.0, "resolution_steps": 1}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }  # fmt: skip
    h = run_prompt(client, big)
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "2" and "over the server's limit" in err["exception_message"]
    info = client.get("/object_info/LatentBatchSeedBehavior").json()["LatentBatchSeedBehavior"]
    assert info["category"] == "latent/advanced"
    assert info["input"]["required"]["seed_behavior"] == [["random", "fixed"], {"default": "fixed"}]


def test_an_rgba_image_is_encoded_by_its_colour():
    """JoinImageWithAlpha makes RGBA images; VAEEncode takes their colour, as ComfyUI's (pixels[..., :3])."""
    from _live_server import shared_loader
    from sdengine.server.comfy.nodes import VaeHandle, vae_encode

    pipe = shared_loader("emoji", "cpu")
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    rgb = rand(1, 32, 32, 3, seed=95)
    (rgba,) = ni.join_image_with_alpha(CTX, rgb, rand(1, 32, 32, seed=96))
    assert rgba.shape[-1] == 4
    assert torch.equal(
        vae_encode(ctx, rgba, VaeHandle("emoji"))[0]["samples"], vae_encode(ctx, rgb, VaeHandle("emoji"))[0]["samples"]
    )
