"""FLUX.1 Kontext with an init image: inpainting against diffusers' FluxKontextInpaintPipeline (0.42.1) on a tiny
random Flux [dev] folder (Kontext [dev] has FLUX.1 [dev]'s shapes), and Kontext img2img, which is that pipeline
with an all-white mask (docs/flux.md): strength 1 and 0.6, with a separate reference image and with the init image
as its own reference (diffusers' ``image_reference=None``), the Kontext auto-resize of the init image, a batch of
two seeds; the reference tokens' effect, the command line and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline import flux_kontext  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT = "make the apple green"
SEED = 3
W, H = 48, 32  # the output; the tiny VAE is 2x: multiples of 4 (16 for Flux.1's 8x VAE)
STEPS = 3


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    import diffusers

    folder = make_flux_folder(tmp_path_factory.mktemp("kontextinpaint") / "tiny-flux-kontext", guidance=True, seed=2)
    ref = diffusers.FluxKontextInpaintPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return folder, sdengine.load_pipeline(folder, device="cpu"), ref


def _init(width: int = W, height: int = H) -> Image.Image:
    return picture(width, height, seed=4)


def _reference() -> Image.Image:
    """A non-square reference whose sides are not multiples of 4 (floored to 40x24 without auto-resize)."""
    return picture(42, 26, seed=1)


def _mask(width: int = W, height: int = H, white: bool = False) -> Image.Image:
    m = np.full((height, width), 255 if white else 0, np.uint8)
    m[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255  # repaint the middle
    return Image.fromarray(m, "L")


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _theirs(ref, init, mask, reference=None, *, strength, seeds=(SEED,), steps=STEPS, prompt=PROMPT, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    args = dict(num_inference_steps=steps, output_type="np", _auto_resize=False, max_area=init.width * init.height)
    args.update(kw)
    out = ref(
        prompt=prompt,
        image=init,
        mask_image=mask,
        image_reference=reference,
        strength=strength,
        generator=gens if len(gens) > 1 else gens[0],
        **args,
    )
    return out.images


def _ours(pipe, init, references, **kw):
    args = dict(steps=STEPS, seed=SEED, init_image=init, reference_images=references, progress=False)
    args.update(reference_auto_resize=False, **kw)
    return pipe(PROMPT, **args)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("separate", [True, False], ids=["reference", "init-as-reference"])
def test_inpainting_matches_diffusers(kontext, strength, separate):
    """A separate reference image is diffusers' ``image_reference``; without one diffusers appends the init image's
    own latent, which is the init image given as the reference here (the same fitting, the same VAE mean)."""
    _, pipe, ref = kontext
    init, mask = _init(), _mask()
    reference = _reference() if separate else None
    ours = _ours(pipe, init, reference if separate else init, mask=mask, strength=strength)
    assert (ours.parameters["width"], ours.parameters["height"]) == (W, H)  # the init image's size
    assert _mad(ours.arrays, _theirs(ref, init, mask, reference, strength=strength)) < TOL
    # the reference tokens change the image: the same call on plain Flux inpainting (FluxInpaintPipeline's) differs
    plain = pipe(PROMPT, steps=STEPS, seed=SEED, width=W, height=H, init_image=init, mask=mask, strength=strength)
    assert _mad(ours.arrays, plain.arrays) > 10 * TOL
    # the known region stays: far from the mask the pixels are the init image's VAE round trip in both
    keep = np.asarray(mask) == 0
    assert _mad(ours.arrays[0][keep], plain.arrays[0][keep]) < _mad(ours.arrays, plain.arrays)


def test_img2img_is_the_inpainting_with_an_all_white_mask(kontext):
    """Kontext img2img (init + reference, no mask): diffusers' FluxKontextInpaintPipeline with an all-white mask
    (its blend then keeps nothing), and sdengine's own inpainting path with that mask."""
    _, pipe, ref = kontext
    init, white = _init(), Image.new("L", (W, H), 255)
    ours = _ours(pipe, init, _reference(), strength=0.6)
    assert ours.parameters["strength"] == 0.6 and ours.parameters["Reference images"] == 1
    assert _mad(ours.arrays, _theirs(ref, init, white, _reference(), strength=0.6)) < TOL
    masked = _ours(pipe, init, _reference(), mask=white, strength=0.6)
    assert _mad(ours.arrays, masked.arrays) < 1e-6
    # the reference tokens are used: another reference, another image
    other = _ours(pipe, init, picture(24, 40, seed=5), strength=0.6)
    assert _mad(ours.arrays, other.arrays) > 10 * TOL
    # and the init latent is the VAE's mean (Kontext's), not the posterior sample of plain Flux img2img
    plain = pipe(PROMPT, steps=STEPS, seed=SEED, width=W, height=H, init_image=init, strength=0.6, progress=False)
    assert _mad(ours.arrays, plain.arrays) > 10 * TOL


def test_auto_resize_of_the_init_image_and_a_batch_match_diffusers(kontext, monkeypatch):
    """Without width and height the output is the init image at its Kontext resolution (the real table is ~1 MP, too
    big for a CPU test: both pipelines get it at 1/16 of its sides), the mask resized to it; two seeds, true CFG
    (diffusers' ``true_cfg_scale``: the reference in both passes)."""
    import diffusers.pipelines.flux.pipeline_flux_kontext_inpaint as theirs_module

    _, pipe, ref = kontext
    small = [(w // 16, h // 16) for w, h in flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS]
    monkeypatch.setattr(flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", tuple(small))
    monkeypatch.setattr(theirs_module, "PREFERRED_KONTEXT_RESOLUTIONS", small)
    init, mask = _init(50, 30), _mask(50, 30)  # floored 48x28 (1.71): nearest 1328x800 -> 83x50 -> 80x48
    ours = pipe(
        [PROMPT, "a dog"],
        steps=2,
        seed=[SEED, 7],
        init_image=init,
        mask=mask,
        strength=0.6,
        reference_images=init,
        negative_prompt="blurry",
        cfg_scale=2.5,
        progress=False,
    )
    assert (ours.parameters["width"], ours.parameters["height"]) == (80, 48)
    assert ours.parameters["Reference image size"] == "80x48"
    theirs = _theirs(
        ref,
        init,
        mask,
        strength=0.6,
        seeds=(SEED, 7),
        steps=2,
        prompt=[PROMPT, "a dog"],
        negative_prompt=["blurry", "blurry"],
        true_cfg_scale=2.5,
        _auto_resize=True,
    )
    assert _mad(ours.arrays, theirs) < TOL


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_latent_resize": True, "width": 24, "height": 16}, "init_latent_resize cannot run together"),
        ({"enable_hr": True}, r"reference_images \(FLUX.1 Kontext\) and the hires fix cannot run together"),
        ({"strength": 0.0}, r"strength must be in \(0, 1\], got 0.0"),
        ({"init_image": "/nonexistent/init.png"}, "init image not found"),
    ],
)
def test_refusals(kontext, kwargs, message):
    _, pipe, _ = kontext
    # references kept at their size: auto-resize would put them at ~1024x1024, over the tiny model's token limit,
    # which is refused first (test_flux_control_preprocess.py covers that refusal)
    args = {"init_image": _init(), "reference_images": _reference(), "reference_auto_resize": False}
    args.update(steps=2, progress=False, **kwargs)
    with pytest.raises(GenerationError, match=message):
        pipe(PROMPT, **args)


def test_cli_init_image_mask_and_reference_image(kontext, tmp_path):
    """``--init-image --mask --reference-image`` on a Kontext model: the pipeline's image (PNG-rounded), its
    infotext says the reference and the strength."""
    from sdengine.metadata import parse_parameters, read_png_parameters

    folder, pipe, _ = kontext
    init, mask, reference = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "ref.png"
    _init().save(init)
    _mask().save(mask)
    _reference().save(reference)
    out = tmp_path / "a.png"
    argv = ["generate", "--model", str(folder), PROMPT, "--steps", "2", "--seed", str(SEED), "--no-progress"]
    argv += ["--init-image", str(init), "--mask", str(mask), "--strength", "0.6"]
    argv += ["--reference-image", str(reference), "--no-reference-resize", "--out", str(out)]
    assert main(argv) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert parsed["Reference images"] == "1" and parsed["Denoising strength"] == "0.6"
    assert parsed["Size"] == f"{W}x{H}"
    want = pipe(
        PROMPT,
        steps=2,
        seed=SEED,
        init_image=_init(),
        mask=_mask(),
        strength=0.6,
        reference_images=_reference(),
        reference_auto_resize=False,
        progress=False,
    )
    got = np.asarray(Image.open(out).convert("RGB"), np.float32) / 255
    assert _mad(got, want.arrays[0]) < 1.0 / 255
