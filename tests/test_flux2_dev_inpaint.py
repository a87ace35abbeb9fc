"""FLUX.2 [dev] img2img and inpainting: klein's algorithm (diffusers' ``Flux2KleinInpaintPipeline``) with [dev]'s
guidance input at every step, on the tiny random [dev] folder (:mod:`_flux2_dev_models`).

diffusers has no [dev] img2img / inpainting pipeline. Its klein inpainting pipeline runs a transformer with a
guidance embedding but hands it ``guidance=None`` (the embedding then adds nothing), so the oracle is that pipeline
over the [dev] folder's scheduler, VAE and transformer, with the transformer's ``guidance`` argument filled with
the scale as diffusers' [dev] ``Flux2Pipeline`` fills it (``torch.full([1], scale).expand(B)``), and the prompt
states of diffusers' [dev] ``Flux2Pipeline.encode_prompt`` (Mistral Small 3) as ``prompt_embeds``. sdengine runs
the folder from prompt strings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from _flux2_dev_models import diffusers_dev_folder, make_dev_folder  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline import load_pipeline  # noqa: E402
from test_flux2_inpaint import _picture, grey_edged_mask  # noqa: E402

W, H = 40, 24  # 5 x 3 diffusion latents with the tiny VAE's 4x
PROMPT = "a red apple on a table"
STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dev_folder(tmp_path_factory.mktemp("flux2devinp") / "dev-tiny", seed=2)


@pytest.fixture(scope="module")
def pipe(folder: Path):
    p = load_pipeline(str(folder), device="cpu", dtype=torch.float32)
    assert p.dev
    return p


def klein_inpaint_with_guidance(folder: Path, guidance: float | None):
    """diffusers' ``Flux2KleinInpaintPipeline`` over the [dev] folder's parts, no CFG (``is_distilled``), its
    transformer given ``guidance`` at every call (None: diffusers' klein pipeline as it is, no guidance)."""
    import diffusers

    transformer = diffusers.Flux2Transformer2DModel.from_pretrained(folder / "transformer")
    assert transformer.config.guidance_embeds
    if guidance is not None:
        forward = transformer.forward

        def with_guidance(*args, **kw):
            assert kw.get("guidance") is None  # the klein pipeline gives none
            b = kw["hidden_states"].shape[0]
            kw["guidance"] = torch.full([1], guidance, dtype=torch.float32).expand(b)
            return forward(*args, **kw)

        transformer.forward = with_guidance
    oracle = diffusers.Flux2KleinInpaintPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(folder / "vae"),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        is_distilled=True,
    )
    oracle.set_progress_bar_config(disable=True)
    return oracle


@pytest.fixture(scope="module")
def states(folder: Path) -> torch.Tensor:
    """diffusers' [dev] prompt states (Mistral Small 3, 512 tokens, left padding)."""
    with torch.no_grad():
        embeds, _ = diffusers_dev_folder(folder).encode_prompt(PROMPT, device=torch.device("cpu"))
    return embeds


def _want(oracle, states, *, init, mask, seed, strength, reference=None) -> np.ndarray:
    kw = {"image_reference": reference} if reference is not None else {}
    return oracle(
        image=init,
        mask_image=mask if mask is not None else Image.new("L", init.size, 255),  # img2img: all white
        prompt_embeds=states,
        num_inference_steps=STEPS,
        strength=strength,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kw,
    ).images[0]


def test_img2img_and_inpainting_match_klein_inpainting_with_dev_guidance(folder: Path, pipe, states) -> None:
    """img2img at strength 0.6 (guidance 4, the default, and 2.5; a batch of two: row 1 is seed + 1's), inpainting
    with a grey-edged mask at 0.6 and 1 (guidance 2.5), inpainting with a reference image beside the init image:
    mean abs difference on 0..1 pixels under 1e-4 against diffusers' klein inpainting pipeline with [dev]'s
    guidance input (measured in the docs' table). The same pipeline without the guidance input (diffusers' klein
    pipeline as it is) is another image: the guidance reaches the transformer."""
    init, mask, ref = _picture(W, H, 3), grey_edged_mask(), _picture(75, 66, 4)
    common = {"steps": STEPS, "seed": 5, "width": W, "height": H, "progress": False}
    gaps: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    worst = 0.0
    oracles = {g: klein_inpaint_with_guidance(folder, g) for g in (4.0, 2.5)}

    got = pipe(PROMPT, init_image=init, strength=0.6, batch_size=2, **common).arrays
    for row in (0, 1):
        want = _want(oracles[4.0], states, init=init, mask=None, seed=5 + row, strength=0.6)
        gaps[f"img2img row {row}"] = float(np.abs(got[row] - want).mean())
        worst = max(worst, float(np.abs(got[row] - want).max()))
    images["img2img g4"] = got[0]
    got = pipe(PROMPT, init_image=init, strength=0.6, distilled_cfg_scale=2.5, **common).arrays[0]
    want = _want(oracles[2.5], states, init=init, mask=None, seed=5, strength=0.6)
    gaps["img2img g2.5"] = float(np.abs(got - want).mean())
    worst = max(worst, float(np.abs(got - want).max()))
    images["img2img g2.5"] = got
    no_guidance = _want(klein_inpaint_with_guidance(folder, None), states, init=init, mask=None, seed=5, strength=0.6)
    assert float(np.abs(got - no_guidance).mean()) > 1e-3
    for strength in (0.6, 1.0):
        got = pipe(PROMPT, init_image=init, mask=mask, strength=strength, distilled_cfg_scale=2.5, **common).arrays[0]
        want = _want(oracles[2.5], states, init=init, mask=mask, seed=5, strength=strength)
        gaps[f"inpaint {strength}"] = float(np.abs(got - want).mean())
        worst = max(worst, float(np.abs(got - want).max()))
        images[f"inpaint {strength}"] = got
    got = pipe(PROMPT, init_image=init, mask=mask, strength=0.6, distilled_cfg_scale=2.5, reference_images=[ref],
               **common).arrays[0]  # fmt: skip
    want = _want(oracles[2.5], states, init=init, mask=mask, seed=5, strength=0.6, reference=ref)
    gaps["reference"] = float(np.abs(got - want).mean())
    worst = max(worst, float(np.abs(got - want).max()))
    images["reference"] = got
    print({k: f"{v:.2g}" for k, v in gaps.items()}, f"max {worst:.2g}")
    assert max(gaps.values()) < 1e-4, gaps
    names = list(images)
    for i, a in enumerate(names):  # each setting changes the image
        for b in names[i + 1 :]:
            assert float(np.abs(images[a] - images[b]).mean()) > 1e-3, (a, b)


def test_strength_1_with_a_full_mask_is_text_to_image_with_the_init_image_as_reference(pipe) -> None:
    """Strength 1 with an all-white mask starts from pure noise and never blends: the text-to-image call with the
    init image as its reference image (klein's algorithm always passes the init image as the first condition image,
    at time id 10, as ``reference_images``' first): bit-equal. Plain text-to-image (no reference) is another
    image."""
    w, h = 80, 64  # a reference is at least 64 pixels a side
    init = _picture(w, h, 3)
    common = {"steps": STEPS, "seed": 9, "width": w, "height": h, "distilled_cfg_scale": 3.0, "progress": False}
    full = pipe(PROMPT, init_image=init, mask=Image.new("L", (w, h), 255), strength=1.0, **common).arrays[0]
    edit = pipe(PROMPT, reference_images=[init], **common).arrays[0]
    np.testing.assert_array_equal(full, edit)
    img2img = pipe(PROMPT, init_image=init, strength=1.0, **common).arrays[0]
    np.testing.assert_array_equal(img2img, edit)
    plain = pipe(PROMPT, **common).arrays[0]
    assert float(np.abs(full - plain).mean()) > 1e-3


def test_cli_generate_with_init_image_mask_and_guidance(folder: Path, pipe, tmp_path: Path) -> None:
    """``sdengine generate --model DEV_FOLDER --init-image --mask --strength --guidance``: the Python call's image;
    the PNG records the guidance and the strength."""
    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, read_png_parameters

    init, mask = _picture(W, H, 3), grey_edged_mask()
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), PROMPT, "--steps", "3", "--seed", "7", "--guidance", "2.5"]
    args += ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "0.6"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    want = pipe(PROMPT, steps=3, seed=7, distilled_cfg_scale=2.5, init_image=init, mask=mask, strength=0.6)
    assert want.images[0].size == (W, H)  # the init image's size (none given)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    parsed = parse_parameters(read_png_parameters(out))
    assert float(parsed["Distilled CFG Scale"]) == 2.5 and float(parsed["Denoising strength"]) == 0.6


def test_refusals_with_an_init_image(pipe) -> None:
    """What [dev] refuses with an init image, one line each before any model runs: CFG, A1111's latent upscale,
    a guidance out of range."""
    init = _picture(W, H, 3)
    cases = [
        ({"cfg_scale": 3.0}, r"cfg_scale 3: FLUX.2 \[dev\] is guidance-distilled and runs without CFG"),
        ({"init_latent_resize": True}, r"init_latent_resize: A1111's latent upscale is not supported for FLUX.2"),
        ({"distilled_cfg_scale": 101.0}, r"distilled_cfg_scale must be in \[0, 100\], got 101.0"),
    ]
    for kw, message in cases:
        with pytest.raises(GenerationError, match=message) as e:
            pipe(PROMPT, steps=1, width=W, height=H, init_image=init, strength=0.5, **kw)
        assert "\n" not in str(e.value)
