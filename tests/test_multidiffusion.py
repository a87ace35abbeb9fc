"""MultiDiffusion (sdengine.diffusion.multidiffusion, docs/multidiffusion.md) against diffusers'
StableDiffusionPanoramaPipeline on the same tiny random SD1 weights, fp32 CPU: the same views (diffusers' own
``get_views``, told the window and stride and the tiny VAE's factor of 2 instead of its fixed 8), the same
scheduler, the same start noise. diffusers steps its scheduler per view and averages the latents after the step;
sdengine averages the views' x0 predictions before its sampler's step. For a deterministic sampler (DDIM at eta 0,
Euler, DPM++ 2M, LMS, Heun, DPM2) the step is affine in the predictions with the same coefficients for every cell,
so both averages give the same latents up to rounding (seen: max 2e-6 on 0..1 pixels), which these tests check; an
ancestral sampler's noise is drawn per view by diffusers, per cell by sdengine (docs/multidiffusion.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_scheduler, picture  # noqa: E402
from sdengine.diffusion.multidiffusion import MultiDiffusion, MultiDiffusionDenoiser, views  # noqa: E402
from sdengine.diffusion.samplers import GuidanceParts  # noqa: E402
from sdengine.errors import UsageError  # noqa: E402
from sdengine.pipeline import GenerationError  # noqa: E402

TOL = 1e-4  # max absolute difference on 0..1 pixels
STEPS = 5
PROMPT, NEGATIVE = "a mountain panorama at dawn", "blurry"
SEED = 7
WINDOW, STRIDE = 16, 8  # latent cells; the tiny VAE's factor is 2, so 32 pixels


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return tiny_sd1_folder, sdengine.load_pipeline(tiny_sd1_folder, device="cpu")


@pytest.fixture(scope="module")
def panorama(sd1):
    import diffusers

    folder = sd1[0]
    ref = diffusers.StableDiffusionPanoramaPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def _theirs(ref, folder, sampler: str, width: int, height: int, *, circular=False, view_batch=1, cfg=7.5):
    cls = type(ref)
    factor = ref.vae_scale_factor
    # diffusers' get_views divides the pixel size by a fixed 8: hand it the size whose eighth is the latent's
    ref.get_views = lambda h, w, circular_padding=False: cls.get_views(
        ref, h * 8 // factor, w * 8 // factor, window_size=WINDOW, stride=STRIDE, circular_padding=circular_padding
    )
    ref.scheduler = diffusers_scheduler(folder, sampler)
    gen = torch.Generator("cpu").manual_seed(SEED)
    return ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        width=width,
        height=height,
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        generator=gen,
        output_type="np",
        circular_padding=circular,
        view_batch_size=view_batch,
    ).images


def _ours(pipe, sampler: str, width: int, height: int, tiled, **kw):
    args = dict(
        steps=STEPS,
        sampler=sampler,
        schedule="normal",
        cfg_scale=7.5,
        seed=SEED,
        width=width,
        height=height,
        progress=False,
        tiled_diffusion=tiled,
    )
    args.update(kw)
    return pipe(PROMPT, NEGATIVE, **args)


def _max(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize(
    "sampler,width,height,view_batch",
    [("ddim", 96, 32, 1), ("euler", 96, 32, 3), ("ddim", 64, 48, 4), ("dpmpp_2m", 96, 32, 1), ("heun", 96, 32, 5)],
)
def test_matches_diffusers_panorama(sd1, panorama, sampler, width, height, view_batch):
    folder, pipe = sd1
    n = len(views(height // 2, width // 2, MultiDiffusion(WINDOW, STRIDE)))
    assert n == (5 if height == 32 else 6)  # overlapping views in one row, or in two rows and three columns
    theirs = _theirs(panorama, folder, sampler, width, height, view_batch=view_batch)
    ours = _ours(pipe, sampler, width, height, (WINDOW, STRIDE, False, view_batch))
    assert ours.arrays.std() > 0.05  # a real picture
    assert _max(ours.arrays, theirs) < TOL
    # and MultiDiffusion changed the picture: the plain pipeline's differs
    plain = _ours(pipe, sampler, width, height, None).arrays
    assert _max(plain, theirs) > 100 * TOL


def test_circular_matches_diffusers_panorama(sd1, panorama):
    folder, pipe = sd1
    theirs = _theirs(panorama, folder, "ddim", 96, 32, circular=True, view_batch=2)
    ours = _ours(pipe, "ddim", 96, 32, {"window": WINDOW, "stride": STRIDE, "circular": True, "view_batch": 2})
    assert _max(ours.arrays, theirs) < TOL
    straight = _ours(pipe, "ddim", 96, 32, (WINDOW, STRIDE)).arrays
    assert _max(straight, theirs) > 100 * TOL  # the wrapped views changed it


def test_window_as_large_as_the_image_is_the_plain_pipeline(sd1):
    _, pipe = sd1
    for kw in ({}, {"init_image": picture(64, 32), "strength": 0.6}):
        plain = _ours(pipe, "euler", 64, 32, None, **kw).arrays
        whole = _ours(pipe, "euler", 64, 32, (64, 8), **kw).arrays  # one view, cut to the 16 x 32 latent
        assert _max(plain, whole) <= 1e-6


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_cfg_pp_samplers_average_the_unconditional_x0_too(sd1, sampler):
    _, pipe = sd1
    plain = _ours(pipe, sampler, 64, 32, None, cfg_scale=1.0).arrays  # CFG++ scales are small
    whole = _ours(pipe, sampler, 64, 32, (64, 8), cfg_scale=1.0).arrays
    tiled = _ours(pipe, sampler, 64, 32, (WINDOW, STRIDE, False, 2), cfg_scale=1.0).arrays
    assert _max(plain, whole) <= 1e-6
    assert _max(plain, tiled) > 100 * TOL and tiled.std() > 0.05


def test_img2img_runs_on_views(sd1):
    _, pipe = sd1
    init = picture(96, 32)
    plain = _ours(pipe, "euler", 96, 32, None, init_image=init, strength=0.7).arrays
    tiled = _ours(pipe, "euler", 96, 32, (WINDOW, STRIDE), init_image=init, strength=0.7)
    batched = _ours(pipe, "euler", 96, 32, (WINDOW, STRIDE, False, 5), init_image=init, strength=0.7).arrays
    assert _max(tiled.arrays, plain) > 100 * TOL  # the views changed it ...
    assert _max(tiled.arrays, batched) < 1e-5  # ... and the view batch size did not
    assert (
        "Tiled Diffusion: MultiDiffusion, Tiled Diffusion window: 16x16, Tiled Diffusion stride: 8"
        in tiled.infotexts[0]
    )


# ------------------------------------------------------------------------------------------ the wrapper


class _PositionBlind:
    """x0 = x * (1 + mean of the view): depends on what the view holds, so a wrong crop or count shows."""

    schedule = None
    prediction = "epsilon"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    takes_guidance_parts = True

    def __call__(self, x, sigma, guidance_parts=None, **cond):
        self.shapes.append(tuple(x.shape))
        assert cond["crossattn"].shape[0] == x.shape[0] and cond["concat"].shape == (x.shape[0], 1, *x.shape[2:])
        out = x * (1 + x.mean(dim=(1, 2, 3), keepdim=True)) + cond["concat"]
        if guidance_parts is not None:  # a CFG++ sampler's unconditional x0: another function of the view
            guidance_parts.uncond = out * x.std(dim=(1, 2, 3), keepdim=True)
        return out


@pytest.mark.parametrize("circular", [False, True])
def test_wrapper_averages_views_per_cell(circular):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 11, generator=g)
    concat = torch.randn(2, 1, 6, 11, generator=g)
    settings = MultiDiffusion(4, 3, circular, 2)
    inner = _PositionBlind()
    den = MultiDiffusionDenoiser(inner, settings)
    parts = GuidanceParts()
    out = den(x, torch.tensor([1.0, 1.0]), crossattn=torch.ones(2, 3, 5), concat=concat, guidance_parts=parts)
    total, count, total_u = torch.zeros_like(x), torch.zeros(6, 11), torch.zeros_like(x)
    layout = views(6, 11, settings)
    for top, bottom, left, right in layout:
        cols = [c % 11 for c in range(left, right)]
        v = x[:, :, top:bottom, cols]
        x0 = v * (1 + v.mean(dim=(1, 2, 3), keepdim=True)) + concat[:, :, top:bottom, cols]
        u0 = x0 * v.std(dim=(1, 2, 3), keepdim=True)
        for j, c in enumerate(cols):
            total[:, :, top:bottom, c] += x0[..., j]
            total_u[:, :, top:bottom, c] += u0[..., j]
            count[top:bottom, c] += 1
    assert bool((count > 0).all())
    assert torch.allclose(out, total / count, atol=1e-6)
    assert parts.uncond is not None and torch.allclose(parts.uncond, total_u / count, atol=1e-6)
    assert inner.shapes[0] == (4, 4, 4, 4)  # two views of two rows in one call, window-sized
    assert len(inner.shapes) == -(-len(layout) // 2)


def test_views_cover_the_edges():
    # diffusers' get_views would stop at 0, 8 (cells 24..29 uncovered); one more view is flush with the edge
    assert [v[2:] for v in views(16, 30, MultiDiffusion(16, 8))] == [(0, 16), (8, 24), (14, 30)]
    assert views(10, 10, MultiDiffusion(64, 8)) == [(0, 10, 0, 10)]
    assert [v[2] for v in views(8, 20, MultiDiffusion(8, 8, True))] == [0, 8, 16]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "value,words",
    [
        ((16, 32), "larger than the window"),
        ((0, 8), "window must be a whole number"),
        ((16, 8, "yes"), "circular must be true or false"),
        ((16, 8, False, 0), "view_batch must be a whole number"),
        ({"window": 16, "overlap": 8}, "unknown tiled diffusion setting 'overlap'"),
        ({"method": "mixture of diffusers"}, "unknown tiled diffusion method"),
        ("64,8", "tiled diffusion takes"),
    ],
)
def test_bad_settings_are_one_line_errors(sd1, value, words):
    _, pipe = sd1
    with pytest.raises(GenerationError, match=words) as e:
        _ours(pipe, "euler", 64, 32, value)
    assert "\n" not in str(e.value)


def test_circular_needs_a_latent_wider_than_the_window(sd1):
    _, pipe = sd1
    with pytest.raises(GenerationError, match="wider than the window"):
        _ours(pipe, "euler", 32, 32, (16, 8, True))
    with pytest.raises(UsageError, match="wider than the window"):
        views(16, 16, MultiDiffusion(16, 8, True))


# ------------------------------------------------------------------------------------------ ControlNet


def _control_models(unet_config, seed: int = 1):
    from _pipeline_models import _perturb
    from sdengine.models.controlnet import ControlNet, ControlNetConfig
    from sdengine.models.t2i_adapter import T2IAdapter, T2IAdapterConfig

    torch.manual_seed(seed)
    cn = ControlNet(ControlNetConfig.from_unet(unet_config, conditioning_embedding_out_channels=(8, 16))).eval()
    _perturb(cn, seed, 0.05)  # zero convs non-zero, so the ControlNet matters
    adapter = T2IAdapter(T2IAdapterConfig(3, (32, 64), 2, 2, "full_adapter")).eval()
    _perturb(adapter, seed + 1, 0.05)
    return cn, adapter


def _wrapped_cut(t: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """t[..., top:bottom, left:right] with the columns past the right edge wrapped, by slicing (not the code's
    index_select)."""
    w = t.shape[-1]
    rows = t[..., top:bottom, :]
    if right <= w:
        return rows[..., left:right]
    return torch.cat([rows[..., left:], rows[..., : right - w]], dim=-1)


@pytest.mark.parametrize("circular,view_batch", [(False, 1), (False, 3), (True, 2)])
def test_controlled_views_equal_each_view_run_by_hand_on_its_cut_hint(circular, view_batch):
    """One MultiDiffusion call over a controlled U-Net (a ControlNet and a T2I-Adapter, two latent rows with two
    maps, CFG's cond and uncond rows) equals each view's controlled U-Net run by hand on the hints cut to its
    pixel window (latent cells x the VAE factor 2), averaged per cell by hand."""
    from dataclasses import replace

    from sdengine.models.unet import TINY_SD, UNet
    from sdengine.pipeline import control as PC

    torch.manual_seed(0)
    unet = UNet(TINY_SD).eval()
    cn, adapter = _control_models(TINY_SD)
    h, w, f = 12, 40, 2
    maps = torch.rand(2, 3, h * f, w * f)
    units = [PC.ControlUnit(cn, maps, 0.8), PC.ControlUnit(adapter, maps.flip(0), 1.2)]
    net = PC.build_controlled_unet(unet, units, width=w * f, height=h * f, grid=torch.tensor([500.0]))
    settings = MultiDiffusion(16, 8, circular, view_batch, window_height=8)
    x, ctx, t = torch.randn(2, 4, h, w), torch.randn(2, 5, 32), 500.0

    def denoiser(network):  # CFG's rows: the conditional ones, then the unconditional ones (tagged)
        def run(xv, sigma, **_):
            n = xv.shape[0]
            c = ctx.repeat(n // 2, 1, 1)
            out = network(
                torch.cat([xv, xv]),
                t,
                encoder_hidden_states=torch.cat([c, c]),
                step=0,
                row_kinds=("cond",) * n + ("uncond",) * n,
            )
            return out[:n] + 2 * (out[:n] - out[n:])

        return run

    layout = views(h, w, settings)
    assert len(layout) >= 6 and (max(v[3] for v in layout) > w) == circular
    with torch.no_grad():
        got = MultiDiffusionDenoiser(denoiser(net), settings, view_hook=net.view_hints)(x, 1.0)
        assert "now" not in net.view_state  # the whole maps again once the views are done
        value, count = torch.zeros_like(x), torch.zeros(1, 1, h, w)
        for top, bottom, left, right in layout:
            cut = [replace(u, image=_wrapped_cut(u.image, top * f, bottom * f, left * f, right * f)) for u in net.units]
            one = PC.ControlledUNet(unet, cut)
            out = denoiser(one)(_wrapped_cut(x, top, bottom, left, right), 1.0)
            cols = torch.arange(left, right) % w
            value[..., top:bottom, :].index_add_(-1, cols, out)
            count[..., top:bottom, :].index_add_(-1, cols, torch.ones(1, 1, bottom - top, right - left))
        want = value / count
        assert (got - want).abs().max().item() < 1e-5
        # the hints acted: the same views without the units differ
        bare = MultiDiffusionDenoiser(denoiser(PC.ControlledUNet(unet, [])), settings)(x, 1.0)
        assert (got - bare).abs().max().item() > 1e-3


def test_a_map_of_another_size_than_the_latent_is_refused_in_one_line():
    from sdengine.errors import ControlNetError
    from sdengine.models.unet import TINY_SD, UNet
    from sdengine.pipeline import control as PC

    unet = UNet(TINY_SD).eval()
    cn, _ = _control_models(TINY_SD)
    net = PC.build_controlled_unet(
        unet, [PC.ControlUnit(cn, torch.rand(1, 3, 24, 24), 1.0)], width=24, height=24, grid=torch.tensor([500.0])
    )
    with pytest.raises(ControlNetError, match="not a whole number of pixels per cell") as e:
        net.view_hints([(0, 8, 0, 8)], (12, 20), 1)
    assert "\n" not in str(e.value)
    # a T2I-Adapter's pixel unshuffle (factor 4 here, 2 latent cells) needs views of whole multiples of it
    from sdengine.models.t2i_adapter import T2IAdapter, T2IAdapterConfig

    adapter = T2IAdapter(T2IAdapterConfig(3, (32, 64), 2, 4, "full_adapter")).eval()
    net = PC.build_controlled_unet(
        unet, [PC.ControlUnit(adapter, torch.rand(1, 3, 24, 40), 1.0)], width=40, height=24, grid=torch.tensor([500.0])
    )
    net.view_hints([(0, 8, 0, 8)], (12, 20), 1)  # 16 x 16 pixels: taken
    with pytest.raises(ControlNetError, match="is not a multiple of the T2I-Adapter's factor 4") as e:
        net.view_hints([(0, 8, 0, 7)], (12, 20), 1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_pipeline_controlnet_with_one_whole_window_is_the_plain_controlnet_image(sd1, kind):
    _, pipe = sd1
    cn, adapter = _control_models(pipe.unet.config)
    unit = [(cn if kind == "controlnet" else adapter, picture(96, 32, seed=4), 0.9)]
    plain = _ours(pipe, "euler", 96, 32, None, controlnets=unit).arrays
    whole = _ours(pipe, "euler", 96, 32, (48, 8), controlnets=unit).arrays  # the whole 16 x 48 latent: one view
    assert _max(plain, whole) <= 1e-6
    tiled = _ours(pipe, "euler", 96, 32, (WINDOW, STRIDE, False, 2), controlnets=unit).arrays
    bare = _ours(pipe, "euler", 96, 32, (WINDOW, STRIDE, False, 2)).arrays
    assert _max(tiled, bare) > 100 * TOL  # the views' hints acted
    assert _max(tiled, plain) > 100 * TOL  # and the views changed the picture


def test_reference_units_are_refused(sd1):
    _, pipe = sd1
    with pytest.raises(GenerationError, match="cannot run with reference control units"):
        _ours(pipe, "euler", 64, 32, (16, 8), controlnets=[("reference_only", picture(64, 32), 1.0)])


# ------------------------------------------------------------------------------------------ other models


def test_inpainting_model_crops_its_masked_image_per_view(tiny_inpaint_folder):
    from _pipeline_models import mask_picture

    pipe = sdengine.load_pipeline(tiny_inpaint_folder, device="cpu")
    kw = dict(init_image=picture(96, 32), mask=mask_picture(96, 32), strength=1.0)
    plain = _ours(pipe, "euler", 96, 32, None, **kw).arrays
    whole = _ours(pipe, "euler", 96, 32, (48, 8), **kw).arrays  # the whole 16 x 48 latent: one view
    tiled = _ours(pipe, "euler", 96, 32, (WINDOW, STRIDE, False, 2), **kw).arrays
    assert _max(plain, whole) <= 1e-6
    assert _max(plain, tiled) > 100 * TOL


def test_sdxl_base_and_refiner_run_on_views(tmp_path):
    from _sdxl_models import make_sdxl_folder
    from sdengine.pipeline.sdxl import SDXLPipeline

    base = sdengine.load_pipeline(make_sdxl_folder(tmp_path / "base"), device="cpu")
    refiner = sdengine.load_pipeline(make_sdxl_folder(tmp_path / "refiner", refiner=True), device="cpu")
    assert isinstance(base, SDXLPipeline)
    plain = _ours(base, "euler", 96, 32, None).arrays
    whole = _ours(base, "euler", 96, 32, (48, 8)).arrays
    tiled = _ours(base, "euler", 96, 32, (WINDOW, STRIDE)).arrays
    assert _max(plain, whole) <= 1e-6
    assert _max(plain, tiled) > 100 * TOL

    def refined(tiled):
        args = dict(steps=STEPS, sampler="euler", seed=SEED, width=96, height=32, progress=False)
        return base.generate_with_refiner(refiner, PROMPT, NEGATIVE, switch_at=0.6, tiled_diffusion=tiled, **args)

    r_plain, r_whole, r_tiled = refined(None).arrays, refined((48, 8)).arrays, refined((WINDOW, STRIDE))
    assert _max(r_plain, r_whole) <= 1e-6
    assert _max(r_plain, r_tiled.arrays) > 100 * TOL
    assert "Tiled Diffusion window: 16x16" in r_tiled.infotexts[0]


# ------------------------------------------------------------------------------------------ CLI and infotext


def test_the_cli_runs_it_and_reads_it_back_from_png(sd1, tmp_path):
    from PIL import Image

    from sdengine.cli import main

    folder, pipe = sd1
    out = tmp_path / "p.png"
    common = ["--model", str(folder), "--steps", "3", "--width", "96", "--height", "32", "--seed", "7"]
    common += ["--sampler", "euler", "--no-progress", "--dtype", "fp32"]
    assert main(["generate", PROMPT, *common, "--tiled-diffusion", "16x12,8,circular,batch=2", "--out", str(out)]) == 0
    want = pipe(
        PROMPT,
        steps=3,
        width=96,
        height=32,
        seed=7,
        sampler="euler",
        progress=False,
        tiled_diffusion={"window": 16, "window_height": 12, "stride": 8, "circular": True, "view_batch": 2},
    )
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    text = Image.open(out).info["parameters"]
    assert "Tiled Diffusion window: 16x12, Tiled Diffusion stride: 8, Tiled Diffusion circular: True" in text
    again = tmp_path / "again.png"
    args = ["generate", "--from-png", str(out), "--model", str(folder), "--no-progress", "--dtype", "fp32"]
    assert main([*args, "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    off = tmp_path / "off.png"
    assert main([*args, "--tiled-diffusion", "off", "--out", str(off)]) == 0
    assert "Tiled Diffusion" not in Image.open(off).info["parameters"]


def test_infotext_fields_read_back(caplog):
    import json
    import logging

    from sdengine.metadata import MetadataError, parse_parameters, to_generate_kwargs

    base = "a\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 96x32"
    kw = to_generate_kwargs(
        parse_parameters(
            base + ", Tiled Diffusion: MultiDiffusion, Tiled Diffusion window: 64x64, Tiled Diffusion stride: 8"
        )
    )
    assert MultiDiffusion.coerce(kw["tiled_diffusion"]) == MultiDiffusion(64, 8)
    assert "tiled_diffusion" not in to_generate_kwargs(parse_parameters(base))
    # the A1111 extension's one field, a dictionary (its tiles are laid out otherwise): not read, warned of
    extension = "{'Method': 'MultiDiffusion', 'Tile tile width': 96, 'Tile tile height': 96, 'Tile Overlap': 48}"
    with caplog.at_level(logging.WARNING, logger="sdengine.metadata"):
        kw = to_generate_kwargs(parse_parameters(base + ", Tiled Diffusion: " + json.dumps(extension)))
    assert (
        "tiled_diffusion" not in kw
        and "not reproduced by sdengine (the image may differ): Tiled Diffusion" in caplog.text
    )
    with pytest.raises(MetadataError, match="Tiled Diffusion window must be WIDTHxHEIGHT"):
        to_generate_kwargs(parse_parameters(base + ", Tiled Diffusion: MultiDiffusion, Tiled Diffusion window: 64"))


@pytest.mark.parametrize(
    "value,why",
    [
        ("64", "--tiled-diffusion takes WINDOW[xHEIGHT],STRIDE"),
        ("64,8,wrap", "--tiled-diffusion takes WINDOW[xHEIGHT],STRIDE"),
        ("64x32x2,8", "--tiled-diffusion takes WINDOW[xHEIGHT],STRIDE"),
        ("64,80", "larger than the window"),
        ("64,8,batch=0", "view_batch must be a whole number"),
    ],
)
def test_bad_cli_values_are_one_line_errors(tmp_path, capsys, value, why):
    from sdengine.cli import main

    rc = main(
        ["generate", "x", "--model", str(tmp_path / "none"), "--tiled-diffusion", value, "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and why in err, err


def test_half_precision_latents_are_summed_in_float32():
    x = torch.randn(1, 4, 8, 40, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    settings = MultiDiffusion(8, 1)  # up to 8 views a cell

    def inner(v, sigma, **cond):
        return v * 1.001

    out = MultiDiffusionDenoiser(inner, settings)(x, torch.tensor([1.0]))
    # every view answers the same bf16 number for a cell: summed in float32 (exact for up to 8 of them) and
    # divided by the count, the mean is that number again; summed in bf16 it would round
    assert out.dtype == torch.bfloat16 and torch.equal(out, inner(x, None))


def test_sag_needs_views_that_take_its_blur(sd1):
    _, pipe = sd1
    with pytest.raises(GenerationError, match="tiled diffusion's views: self-attention guidance blurs"):
        _ours(pipe, "euler", 96, 32, (4, 2), sag_scale=0.5)


def test_both_hires_passes_run_on_views(sd1):
    _, pipe = sd1
    hr = dict(enable_hr=True, hr_scale=2.0, strength=0.5, hr_upscaler="Latent")
    plain = _ours(pipe, "euler", 48, 32, None, **hr)
    whole = _ours(pipe, "euler", 48, 32, (48, 8), **hr)  # the second pass's 32 x 48 latent: one view
    tiled = _ours(pipe, "euler", 48, 32, (WINDOW, STRIDE), **hr)
    assert plain.arrays.shape[1:3] == (64, 96)
    assert _max(plain.arrays, whole.arrays) <= 1e-6
    assert _max(plain.arrays, tiled.arrays) > 100 * TOL
    assert "Tiled Diffusion stride: 8" in tiled.infotexts[0] and "Hires upscale: 2" in tiled.infotexts[0]


def test_the_unet_only_sees_windows(sd1):
    _, pipe = sd1
    seen: list[tuple[int, ...]] = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    try:
        _ours(pipe, "euler", 96, 64, (WINDOW, STRIDE, False, 3))
    finally:
        handle.remove()
    # a 32 x 48 latent: 3 rows of 5 views, 3 views (6 rows with the unconditional ones) per call
    assert seen and {s[-2:] for s in seen} == {(WINDOW, WINDOW)}
    assert len(seen) == STEPS * 5 and {s[0] for s in seen} == {6}


def test_a_batch_of_rows_equals_each_row_alone(sd1):
    """Two seeds with two prompts in one call, three views per U-Net call (six rows of the conditional and the
    unconditional text each, repeated view by view): each row is the image of its seed made alone. (diffusers'
    panorama pipeline pairs the rows with the wrong texts for more than one image per call: its
    ``torch.cat([negative, positive])`` embeddings against ``repeat_interleave(2)`` latents.)"""
    _, pipe = sd1
    tiled = (WINDOW, STRIDE, False, 3)
    args = dict(steps=STEPS, sampler="euler", cfg_scale=7.5, width=96, height=32, progress=False, tiled_diffusion=tiled)
    both = pipe([PROMPT, "a forest"], [NEGATIVE, "dark"], seed=[SEED, SEED + 5], **args).arrays
    one = pipe(PROMPT, NEGATIVE, seed=SEED, **args).arrays
    two = pipe("a forest", "dark", seed=SEED + 5, **args).arrays
    assert _max(both[:1], one) < 1e-5 and _max(both[1:], two) < 1e-5
    assert _max(one, two) > 100 * TOL
