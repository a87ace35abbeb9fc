"""A1111's built-in "Soft Inpainting" (extensions-builtin/soft-inpainting): its functions against an oracle written
here step by step from A1111's script (get_modified_nmask, latent_blend, weighted_histogram_filter's per-pixel loop,
apply_adaptive_masks), the pipeline option on a tiny model (the kept region, the difference from hard inpainting,
off = plain inpainting), the infotext and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.metadata import MetadataError
from sdengine.pipeline import GenerationError, load_pipeline
from sdengine.pipeline.soft_inpaint import (
    SoftInpainting,
    difference_opacity,
    gaussian_kernel,
    latent_blend,
    modified_mask,
    weighted_percentile_filter,
)

SEED = 7

# ------------------------------------------------------------------------------------- the oracle (A1111's code)


def oracle_modified_nmask(nmask: np.ndarray, sigma: float, power: float, scale: float) -> np.ndarray:
    return np.power(nmask, (sigma**power) * scale)


def oracle_latent_blend(a: np.ndarray, b: np.ndarray, t: np.ndarray, detail: float) -> np.ndarray:
    """a, b (B, C, h, w); t (C, h, w), A1111's 3-dim nmask: t2 = t[None], t3 = t[0][None, None]."""
    t2, t3 = t[None], t[0][None, None]
    interp = a * (1 - t2) + b * t2
    cur = np.sqrt((interp.astype(np.float64) ** 2).sum(1, keepdims=True)) + 0.00001
    am = np.sqrt((a.astype(np.float64) ** 2).sum(1, keepdims=True)) ** detail * (1 - t3)
    bm = np.sqrt((b.astype(np.float64) ** 2).sum(1, keepdims=True)) ** detail * t3
    desired = (am + bm) ** (1 / detail)
    return interp * (desired / cur).astype(interp.dtype)


def oracle_kernel(stddev: float = 1.5, max_radius: int = 2) -> tuple[np.ndarray, int]:
    def gaussian(sqr_mag: float) -> float:
        return math.exp(-sqr_mag / (stddev * stddev))

    zero_radius = max_radius + 1.0
    gauss_zero = gaussian(zero_radius * zero_radius)
    scale = 1 / (1 - gauss_zero)
    size = max_radius * 2 + 1
    kernel = np.zeros((size, size))
    for index in np.ndindex(kernel.shape):
        c = np.array(index) - max_radius
        x = gaussian(c[0] ** 2.0 + c[1] ** 2.0)
        kernel[index] = max(0.0, (x - gauss_zero) * scale)
    return kernel, max_radius


def oracle_histogram_filter(img, kernel, kernel_center, pmin, pmax, min_width=1.0):
    """weighted_histogram_filter, pixel by pixel, element by element, as A1111's loop."""
    kernel_min = -kernel_center
    kernel_max = np.array(kernel.shape) - kernel_center
    out = img.copy()
    for idx in np.ndindex(img.shape):
        idx_v = np.array(idx)
        lo_i = np.maximum(0, idx_v + kernel_min)
        hi_i = np.minimum(np.array(img.shape), idx_v + kernel_max)
        values = []
        for win in np.ndindex(tuple(hi_i - lo_i)):
            image_index = np.array(win) + lo_i
            k_index = image_index - idx_v + kernel_center
            values.append([img[tuple(image_index)], kernel[tuple(k_index)], 0.0, 1.0])
        values.sort(key=lambda e: e[0])
        total = 0
        for e in values:
            e[2] = total
            total += e[1]
            e[3] = total
        wmin, wmax = total * pmin, total * pmax
        if wmax - wmin < min_width:
            c = (wmin + wmax) / 2
            wmin, wmax = c - min_width / 2, c + min_width / 2
            if wmax > total:
                wmax, wmin = total, total - min_width
            if wmin < 0:
                wmin, wmax = 0, min_width
        value = value_weight = 0
        for e in values:
            if wmin >= e[3]:
                continue
            if wmax <= e[2]:
                break
            w = min(wmax, e[3]) - max(wmin, e[2])
            value += e[0] * w
            value_weight += w
        out[idx] = value / value_weight if value_weight != 0 else 0
    return out


def oracle_opacity(orig, processed, nmask, s: SoftInpainting) -> list[np.ndarray]:
    """apply_adaptive_masks up to its ``255. * converted_mask`` (float32 as there); nmask (C, h, w)."""
    latent_mask = nmask[0].astype(np.float32)
    scalar = 1 - np.clip(latent_mask, 0, 1) ** (s.preservation_strength / 2)
    scalar = 0.5 * (1 - s.mask_influence) + scalar * s.mask_influence
    scalar = (scalar / (1.00001 - scalar)).astype(np.float32)
    distance = np.sqrt(((processed - orig) ** 2).sum(1)).astype(np.float32)
    kernel, center = oracle_kernel()
    out = []
    for d in distance:
        d = oracle_histogram_filter(d, kernel, center, 0.9, 1)
        d = oracle_histogram_filter(d, kernel, center, 0.25, 0.75)
        x = d / (s.difference_threshold * scalar)
        x = 1 / (1 + x**s.difference_contrast)
        x = x * x * x * (x * (6 * x - 15) + 10)
        out.append(1 - x)
    return out


# ------------------------------------------------------------------------------- the functions against the oracle


def test_modified_mask_and_latent_blend_follow_a1111():
    g = np.random.default_rng(0)
    nmask = g.uniform(0, 1, (8, 10)).astype(np.float32)
    nmask[0, :3] = [0.0, 1.0, 0.5]
    a = g.normal(size=(2, 4, 8, 10)).astype(np.float32)
    b = g.normal(size=(2, 4, 8, 10)).astype(np.float32) * 1.7
    for power, scale, detail, sigma in ((1.0, 0.5, 4.0, 3.2), (2.3, 1.75, 1.0, 0.4), (0.0, 0.0, 32.0, 9.0)):
        s = SoftInpainting(schedule_bias=power, preservation_strength=scale, transition_contrast_boost=detail)
        t = modified_mask(torch.from_numpy(nmask)[None, None], torch.tensor([sigma, sigma]), s)
        want_t = oracle_modified_nmask(np.tile(nmask[None], (4, 1, 1)), np.float32(sigma), power, scale)
        np.testing.assert_allclose(t[0, 0].numpy(), want_t[0], rtol=1e-6, atol=1e-7)
        got = latent_blend(torch.from_numpy(a), torch.from_numpy(b), t, detail).numpy()
        want = oracle_latent_blend(a, b, want_t.astype(np.float32), detail)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    # the ends: nmask 0 keeps a exactly in direction and length (up to the 1e-5 guard), 1 takes b
    t = modified_mask(torch.from_numpy(nmask)[None, None], 2.0, SoftInpainting())
    out = latent_blend(torch.from_numpy(a), torch.from_numpy(b), t, 4.0).numpy()
    np.testing.assert_allclose(out[:, :, 0, 0], a[:, :, 0, 0], rtol=1e-4)
    np.testing.assert_allclose(out[:, :, 0, 1], b[:, :, 0, 1], rtol=1e-4)


def test_the_kernel_and_the_percentile_filter_follow_a1111():
    kernel, center = oracle_kernel()
    np.testing.assert_allclose(gaussian_kernel(), kernel, rtol=1e-12)
    g = np.random.default_rng(1)
    img = (g.gamma(1.0, 1.0, (9, 11)) * (g.uniform(size=(9, 11)) > 0.3)).astype(np.float32)
    img[4, :] = img[4, 0]  # ties
    for low, high in ((0.9, 1.0), (0.25, 0.75), (0.0, 1.0), (0.5, 0.5)):
        want = oracle_histogram_filter(img, kernel, center, low, high)
        got = weighted_percentile_filter(img, gaussian_kernel(), low, high)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "settings",
    [
        SoftInpainting(),
        SoftInpainting(preservation_strength=1.3, mask_influence=0.6, difference_threshold=1.25, difference_contrast=5),
    ],
)
def test_the_composite_opacity_follows_a1111(settings):
    g = np.random.default_rng(2)
    orig = g.normal(size=(2, 4, 8, 8)).astype(np.float32)
    processed = orig + g.normal(size=(2, 4, 8, 8)).astype(np.float32) * g.uniform(0, 1.5, (2, 1, 8, 8)).astype(
        np.float32
    )
    processed[:, :, :, :3] = orig[:, :, :, :3]  # unchanged columns
    nmask = np.clip(np.linspace(-0.2, 1.2, 8, dtype=np.float32)[None, :].repeat(8, 0), 0, 1)
    got = difference_opacity(
        torch.from_numpy(orig), torch.from_numpy(processed), torch.from_numpy(nmask)[None, None], settings
    )
    want = oracle_opacity(orig, processed, np.tile(nmask[None], (4, 1, 1)), settings)
    for row in range(2):
        np.testing.assert_allclose(got[row], want[row], rtol=1e-5, atol=1e-6)
        assert np.array_equal((255.0 * got[row]).astype(np.uint8), (255.0 * want[row]).astype(np.uint8))
    assert got.min() < 0.05 and got.max() > 0.5  # both ends are reached on these inputs


def test_the_blend_runs_on_each_calls_x0_as_a1111s_denoiser_does():
    """SoftInpaintBlend around a stand-in x0-denoiser under sdengine's Euler equals an Euler loop written from
    A1111's CFGDenoiser.forward: each call's x0 blended with the init latent by the modified mask at that call's
    sigma (``sigma[0]``), the sampler keeping its own x, and no final hard blend."""
    from sdengine.diffusion.samplers import sample_euler
    from sdengine.pipeline.soft_inpaint import SoftInpaintBlend

    g = torch.Generator().manual_seed(3)
    init = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    nmask = torch.linspace(0, 1, 8).reshape(1, 1, 1, 8).expand(1, 1, 8, 8).contiguous()

    def x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return 0.6 * x.flip(-1) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) ** 0.5 + 0.3

    settings = SoftInpainting(schedule_bias=0.8, preservation_strength=1.5, transition_contrast_boost=3.0)
    sigmas = torch.tensor([6.0, 3.0, 1.5, 0.6, 0.2, 0.0])
    got = sample_euler(SoftInpaintBlend(lambda x, s, **_: x0(x, s), init, nmask, settings), init + noise * 6.0, sigmas)
    t3 = nmask.numpy()[0].repeat(4, 0)  # A1111's nmask: the latent mask tiled over the channels, (C, h, w)
    x = (init + noise * 6.0).numpy()
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        den = x0(torch.from_numpy(x), torch.tensor([s, s])).numpy()
        t = oracle_modified_nmask(t3, np.float32(s), 0.8, 1.5).astype(np.float32)
        den = oracle_latent_blend(init.numpy(), den, t, 3.0)
        x = x + (x - den) / s * (s_next - s)
    np.testing.assert_allclose(got.numpy(), x, rtol=1e-4, atol=1e-5)
    hard = init.numpy() * (1 - t3) + x * t3  # what A1111's final blend would make of it: not done
    assert np.abs(got.numpy() - hard).max() > 1e-2


def test_settings_are_checked_in_one_line():
    assert SoftInpainting.of(True) == SoftInpainting()
    assert SoftInpainting.of(None) is None and SoftInpainting.of(False) is None
    assert SoftInpainting.of({"mask_influence": 0.25}).mask_influence == 0.25
    for bad, name in (({"schedule_bias": 9}, "schedule_bias"), ({"transition_contrast_boost": 0.5}, "transition"),
                      ({"mask_influence": float("nan")}, "mask_influence"), ({"difference_contrast": "2"}, "contrast"),
                      ({"bogus": 1}, "unknown setting 'bogus'")):  # fmt: skip
        with pytest.raises(GenerationError, match=name) as e:
            SoftInpainting.of(bad)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- the pipeline option


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return load_pipeline(tiny_sd1_folder, device="cpu")


def _picture() -> Image.Image:
    a = np.zeros((64, 64, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(255, 0, 64, dtype=np.uint8)[:, None]
    a[10:30, 36:60, 2] = 220
    return Image.fromarray(a)


def _mask() -> Image.Image:
    """0 over the left 24 columns, a ramp to 1 over the next 24, 1 on the right 16."""
    row = np.clip((np.arange(64) - 24) / 24, 0, 1)
    return Image.fromarray(np.tile(np.round(row * 255).astype(np.uint8)[None], (64, 1)), "L")


KW = dict(width=64, height=64, steps=4, seed=SEED, cfg_scale=5.0, sampler="euler", strength=0.9, progress=False,
          strength_rule="a1111", mask_blur=0.0)  # fmt: skip


def test_the_kept_region_is_the_original_and_soft_differs_from_hard(sd1):
    soft = sd1("a red apple", "", init_image=_picture(), mask=_mask(), soft_inpainting=True, **KW)
    hard = sd1("a red apple", "", init_image=_picture(), mask=_mask(), **KW)
    got, plain, orig = (np.asarray(x) for x in (soft.images[0], hard.images[0], _picture()))
    m = np.asarray(soft.composite_masks[0])
    assert m.shape == (64, 64)
    kept = m == 0
    assert kept[:, :8].all() and not kept[:, -8:].any()  # far from the mask: 0; where it is 1: the generated
    assert np.array_equal(got[kept], orig[kept])  # the original's pixels exactly where the composite mask is 0
    assert (got != plain).any(axis=-1)[:, 24:48].mean() > 0.5  # the transition is not hard inpainting's
    assert "Soft inpainting enabled: True" in soft.infotexts[0]
    assert "Soft inpainting schedule bias: 1, Soft inpainting preservation strength: 0.5" in soft.infotexts[0]
    assert "Soft inpainting" not in hard.infotexts[0] and hard.composite_masks is None


@pytest.mark.parametrize("sampler", ["ddim", "plms", "unipc"])
def test_a1111s_timestep_samplers_run_it_and_differ_from_plain_inpainting(sd1, sampler):
    """Under A1111's strength rule DDIM, PLMS and UniPC run soft inpainting (they were refused), blending the
    network's input before each call (the blend itself: the oracle tests above): the original's pixels where the
    composite mask is 0, the image not plain inpainting's, every call of the blend before the network."""
    kw = {**KW, "sampler": sampler}
    soft = sd1("a red apple", "", init_image=_picture(), mask=_mask(), soft_inpainting=True, **kw)
    hard = sd1("a red apple", "", init_image=_picture(), mask=_mask(), **kw)
    got, plain, orig = (np.asarray(x) for x in (soft.images[0], hard.images[0], _picture()))
    # where the mask is 0 the network reads the init latent, but the sampler's own latent is not pulled back to it
    # (A1111's timestep samplers leave that to the final blend, which the script skips): the composite mask lets
    # the generated pixels through where that latent drifted (on this random model, nearly everywhere)
    m = np.asarray(soft.composite_masks[0])
    assert m[:, :8].mean() > 128
    assert np.array_equal(got[m == 0], orig[m == 0])
    assert (got != plain).any(axis=-1)[:, 24:48].mean() > 0.5 and (got != plain).any(axis=-1)[:, :8].mean() > 0.5
    assert "Soft inpainting enabled: True" in soft.infotexts[0]
    raw = sd1("a red apple", "", init_image=_picture(), mask=_mask(), soft_inpainting={"composite": False}, **kw)
    from sdengine.pipeline.soft_inpaint import SoftInpaintBlend

    calls: list[bool] = []
    real = SoftInpaintBlend.__call__

    def spy(self, *a, **k):
        calls.append(self.before)
        return real(self, *a, **k)

    SoftInpaintBlend.__call__ = spy  # type: ignore[method-assign]
    try:
        again = sd1("a red apple", "", init_image=_picture(), mask=_mask(), soft_inpainting={"composite": False},
                    **kw)  # fmt: skip
    finally:
        SoftInpaintBlend.__call__ = real  # type: ignore[method-assign]
    assert calls and all(calls)  # every call blends before the network
    np.testing.assert_array_equal(again.arrays, raw.arrays)


def test_off_is_plain_inpainting_and_the_infotext_reads_back(sd1):
    plain = sd1("a red apple", "", init_image=_picture(), mask=_mask(), **KW)
    off = sd1("a red apple", "", init_image=_picture(), mask=_mask(), soft_inpainting=False, **KW)
    assert np.array_equal(np.asarray(off.images[0]), np.asarray(plain.images[0])) and off.infotexts == plain.infotexts
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    settings = {"schedule_bias": 2.5, "mask_influence": 0.5, "difference_contrast": 4.0}
    res = sd1("a red apple", "", init_image=_picture(), mask=_mask(), soft_inpainting=settings, **KW)
    found = to_generate_kwargs(parse_parameters(res.infotexts[0]))
    assert found["soft_inpainting"] == {
        **{
            n: v
            for n, v in zip(
                (
                    "schedule_bias",
                    "preservation_strength",
                    "transition_contrast_boost",
                    "mask_influence",
                    "difference_threshold",
                    "difference_contrast",
                ),
                (1.0, 0.5, 4.0, 0.0, 0.5, 2.0),
                strict=True,
            )
        },
        **settings,
    }
    again = sd1(init_image=_picture(), mask=_mask(), progress=False, **{**found, "mask_blur": 0.0})
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(res.images[0]))  # fmt: skip
    with pytest.raises(MetadataError, match="Soft inpainting mask influence"):
        to_generate_kwargs(parse_parameters(res.infotexts[0].replace("mask influence: 0.5", "mask influence: x")))
    disabled = res.infotexts[0].replace("Soft inpainting enabled: True", "Soft inpainting enabled: False")
    assert "soft_inpainting" not in to_generate_kwargs(parse_parameters(disabled))


def test_what_it_does_not_combine_with_is_refused_in_one_line(sd1):
    picture, mask = _picture(), _mask()
    cases = (
        (dict(init_image=picture), "soft_inpainting needs a mask"),
        (dict(init_image=picture, mask=mask, differential_diffusion=1.0, strength_rule="diffusers"), "use one"),
        (dict(init_image=picture, mask=mask, soft_inpainting={"difference_threshold": 9}), r"in \[0, 8\], got 9"),
    )
    for extra, said in cases:
        kw = {**KW, "soft_inpainting": True, **extra}
        with pytest.raises(GenerationError, match=said) as e:
            sd1("x", **kw)
        assert "\n" not in str(e.value)
    # (a 9-channel inpainting model runs it, its mask input grey: tests/test_a1111_mask_round.py)
    from sdengine.pipeline import GenerationRequest
    from sdengine.pipeline.sdxl import check_hand_off

    request = GenerationRequest("x", init_image=picture, mask=mask, soft_inpainting=True)
    with pytest.raises(GenerationError, match="soft_inpainting is not supported with a refiner hand-off"):
        check_hand_off(request, 0.8, "a1111")


def test_the_cli_flag_and_from_png_reproduce_the_image(tiny_sd1_folder, tmp_path, capsys):
    from sdengine.cli import main

    init, mask, png, again = (tmp_path / n for n in ("init.png", "mask.png", "a.png", "b.png"))
    _picture().save(init)
    _mask().save(mask)
    common = ["--model", str(tiny_sd1_folder), "--init-image", str(init), "--mask", str(mask), "--no-progress"]
    args = ["a cat", "--steps", "3", "--sampler", "euler", "--seed", "3", "--width", "64", "--height", "64", *common]
    assert main(["generate", *args, "--soft-inpainting", "1.5,0.5,4,mask_influence=0.25", "--out", str(png)]) == 0
    text = Image.open(png).info["parameters"]
    assert "Soft inpainting schedule bias: 1.5" in text and "Soft inpainting mask influence: 0.25" in text, text
    capsys.readouterr()
    assert main(["generate", "--from-png", str(png), *common, "--out", str(again)]) == 0
    assert "not reproduced" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
    bad_flags = (
        (["--soft-inpainting", "1,2,3,4,5,6,7"], "--soft-inpainting"),
        (["--soft-inpainting", "bias=2"], "--soft-inpainting"),
        (["--soft-inpainting", "mask_influence=3"], "mask_influence must be a number in [0, 1]"),
    )
    for bad, said in bad_flags:
        rc = main(["generate", *args, *bad, "--out", str(tmp_path / "c.png")])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and err.count("\n") == 1, err
    rc = main(["generate", "a cat", "--model", str(tiny_sd1_folder), "--soft-inpainting", "--out",
               str(tmp_path / "c.png"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--soft-inpainting" in err and "--mask" in err, err
    assert not (tmp_path / "c.png").exists()


# ------------------------------------------- A1111's timestep samplers (DDIM, PLMS, UniPC): the blend before the call


def _sd_schedule():
    from sdengine.diffusion.schedules import NoiseSchedule

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return NoiseSchedule.from_betas(betas)


def _eps(x_vp: np.ndarray, t: float) -> np.ndarray:
    """A stand-in noise-predicting network (numpy, float64), reading its timestep."""
    return 0.5 * x_vp[..., ::-1] + 0.2 * np.sin(x_vp) + 0.1 * t / 1000.0


class _EpsNet:
    """The stand-in as sdengine's VE x0-denoiser (its timestep: the schedule's log-sigma inverse of sigma)."""

    prediction = "epsilon"

    def __init__(self, ns, outer=None) -> None:
        self.schedule, self.outer = ns, outer

    def __call__(self, x: torch.Tensor, sigma, **_) -> torch.Tensor:
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        t = float(self.schedule.sigma_to_t(torch.tensor(s, dtype=torch.float64)))
        c = math.sqrt(1 + s * s)
        x_vp = x.double().numpy() / c
        if self.outer is not None:  # A1111's CFGDenoiserTimesteps around the network: the blend at the timestep
            x_vp = self.outer(x_vp, t)
        return x - s * torch.from_numpy(_eps(x_vp, t)).to(x.dtype)


def _a1111_blend(init: np.ndarray, t3: np.ndarray, power: float, scale: float, detail: float):
    """A1111's apply_blend with the script's on_mask_blend, before the model call (mask_before_denoising): the
    sampler's x blended with the init latent by the modified nmask at ``sigma[0]``, which is the call's timestep."""

    def blend(x: np.ndarray, ts: float) -> np.ndarray:
        t = oracle_modified_nmask(t3, np.float32(ts), power, scale).astype(np.float32)
        return oracle_latent_blend(init, x.astype(np.float32), t, detail).astype(np.float64)

    return blend


def _timestep_case():
    g = torch.Generator().manual_seed(5)
    init = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    nmask = torch.linspace(0, 1, 8).reshape(1, 1, 1, 8).expand(1, 1, 8, 8).contiguous()
    # schedule_bias 0.25: the exponent timestep ** 0.25 * 0.5 stays near 1-3, so the grey levels show in the blend
    settings = SoftInpainting(schedule_bias=0.25, preservation_strength=0.5, transition_contrast_boost=3.0)
    t3 = nmask.numpy()[0].repeat(4, 0)  # A1111's nmask: (C, h, w)
    return init, noise, nmask, settings, t3


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_a1111_ddim_and_plms_blend_the_networks_input_at_the_timestep(sampler):
    """SoftInpaintBlend(before=True) inside sdengine's DDIM / PLMS on A1111's grid equals a loop written from
    A1111's ``ddim`` / ``plms`` (sd_samplers_timesteps_impl) around its CFGDenoiserTimesteps: before each call the
    sampler's (VP) x is blended with the init latent by ``nmask ** (timestep ** power * scale)``, the network reads
    that, the sampler steps its own x with the network's eps, and the result is not hard-blended at the end."""
    from sdengine.diffusion import sampling
    from sdengine.pipeline.soft_inpaint import SoftInpaintBlend

    ns = _sd_schedule()
    init, noise, nmask, settings, t3 = _timestep_case()
    steps = 5
    blend = SoftInpaintBlend(_EpsNet(ns), init, nmask, settings, before=True)
    grid = sampling.make_grid(sampler, steps, ns, a1111_grid=True)
    got = sampling.sample(blend, noise, sampler=sampler, steps=steps, noise_schedule=ns, a1111_grid=True,
                          noise_scale=math.sqrt(1 + float(grid.sigmas[0]) ** 2))  # fmt: skip
    # the oracle: A1111's CompVisSampler.sample (x = the noise) with its ddim / plms, float64
    ac = ns.alphas_cumprod.double().numpy()
    timesteps = np.clip(np.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    alphas, alphas_prev = ac[timesteps], ac[np.concatenate([[0], timesteps[:-1]])]
    blend_in = _a1111_blend(init.numpy(), t3, 0.25, 0.5, 3.0)

    def model(x: np.ndarray, ts: float) -> np.ndarray:
        return _eps(blend_in(x, ts), ts)

    x = noise.double().numpy()
    old: list[np.ndarray] = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i

        def step(e, x=x, index=index):
            pred = (x - math.sqrt(1 - alphas[index]) * e) / math.sqrt(alphas[index])
            return math.sqrt(alphas_prev[index]) * pred + math.sqrt(1 - alphas_prev[index]) * e

        e_t = model(x, float(timesteps[index]))
        if sampler == "ddim":
            x = step(e_t)
            continue
        if not old:
            e_next = model(step(e_t), float(timesteps[max(index - 1, 0)]))
            e_p = (e_t + e_next) / 2
        elif len(old) == 1:
            e_p = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_p = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_p = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = step(e_p)
        old = [*old, e_t][-3:]
    np.testing.assert_allclose(got.double().numpy(), x, rtol=1e-4, atol=1e-4)
    # not the k-diffusion samplers' blend (on x0, at the noise level), not plain (hard) inpainting
    after = sampling.sample(SoftInpaintBlend(_EpsNet(ns), init, nmask, settings), noise, sampler=sampler,
                            steps=steps, noise_schedule=ns, a1111_grid=True,
                            noise_scale=math.sqrt(1 + float(grid.sigmas[0]) ** 2))  # fmt: skip
    assert float((after - got).abs().max()) > 1e-2
    from sdengine.pipeline.latents import A1111Blend

    rounded = nmask.round()
    hard = sampling.sample(A1111Blend(_EpsNet(ns), init, rounded, before=True), noise, sampler=sampler, steps=steps,
                           noise_schedule=ns, a1111_grid=True,
                           noise_scale=math.sqrt(1 + float(grid.sigmas[0]) ** 2))  # fmt: skip
    hard = hard * rounded + init * (1 - rounded)
    assert float((hard - got).abs().max()) > 1e-2


def test_unipc_blends_the_networks_input_as_a1111s_cfg_denoiser_timesteps():
    """With UniPC (A1111's timestep sampler too) the blend is before each call at the call's timestep: sdengine's
    UniPC around SoftInpaintBlend(before=True) equals the same UniPC around a network that blends its own input as
    A1111's CFGDenoiserTimesteps does (the oracle blend, numpy), and differs from the blend on x0."""
    from sdengine.diffusion import sampling
    from sdengine.pipeline.soft_inpaint import SoftInpaintBlend

    ns = _sd_schedule()
    init, noise, nmask, settings, t3 = _timestep_case()
    kw = dict(sampler="unipc", steps=5, noise_schedule=ns)
    got = sampling.sample(SoftInpaintBlend(_EpsNet(ns), init, nmask, settings, before=True), noise, **kw)
    want = sampling.sample(_EpsNet(ns, outer=_a1111_blend(init.numpy(), t3, 0.25, 0.5, 3.0)), noise, **kw)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    after = sampling.sample(SoftInpaintBlend(_EpsNet(ns), init, nmask, settings), noise, **kw)
    assert float((after - got).abs().max()) > 1e-2
