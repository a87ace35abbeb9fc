"""sdengine's FLUX.2 [klein] pipeline against diffusers' ``Flux2KleinPipeline`` on tiny random parts saved in
diffusers' layout, with the same prompt embeddings (the text encoder's side is ``test_flux2_text.py``'s) and the same
seeds: the schedule (empirical mu), the noise, CFG with and without a negative prompt, the latent patchify and
batch-norm (de)normalisation, the decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _flux2_models import diffusers_klein, save_parts
from sdengine.errors import GenerationError
from sdengine.pipeline.flux2 import Flux2Pipeline, empirical_mu
from sdengine.weights.flux2_file import load_flux2_transformer, load_flux2_vae

W, H = 40, 24  # the tiny VAE's 4x and the 2x2 patches: 5 x 3 diffusion latents, non-square
TEXT = 6  # tokens of each prompt's states (max_sequence_length)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_parts(tmp_path_factory.mktemp("flux2") / "klein-tiny")


@pytest.fixture(scope="module")
def table() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {text: torch.randn(1, TEXT, 24, generator=g) for text in ("a red apple", "", "blurry")}


def _ours(folder: Path, table: dict[str, torch.Tensor], *, distilled: bool = False) -> Flux2Pipeline:
    import json

    calls: list[str] = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.extend(texts)
        return table[texts[0]]

    pipe = Flux2Pipeline(
        transformer=load_flux2_transformer(folder),
        vae=load_flux2_vae(folder),
        text_encode=encode,
        distilled=distilled,
        max_sequence_length=TEXT,
        scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        device=torch.device("cpu"),
        dtype=torch.float32,
        name="klein-tiny",
        source=folder,
    )
    pipe.encoded = calls  # type: ignore[attr-defined]
    return pipe


def _diffusers(oracle, table, *, seed: int, steps: int, scale: float, negative: str = "") -> np.ndarray:
    out = oracle(
        prompt_embeds=table["a red apple"],
        negative_prompt_embeds=table[negative],
        guidance_scale=scale,
        height=H,
        width=W,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=TEXT,
        output_type="np",
    )
    return out.images[0]


def test_matches_diffusers_base(folder: Path, table) -> None:
    """The undistilled model: no CFG at scale 1, CFG at 3 with the empty negative and with a negative prompt; mean
    abs difference on 0..1 pixels under 1e-4 (measured about 1e-7), the images themselves not flat."""
    oracle = diffusers_klein(folder)
    pipe = _ours(folder, table)
    for scale, negative in ((1.0, ""), (3.0, ""), (3.0, "blurry")):
        want = _diffusers(oracle, table, seed=7, steps=4, scale=scale, negative=negative)
        got = pipe("a red apple", negative, cfg_scale=scale, steps=4, seed=7, width=W, height=H).arrays[0]
        assert got.shape == want.shape == (H, W, 3)
        assert float(np.abs(got - want).mean()) < 1e-4, (scale, negative)
        assert float(want.std()) > 0.02
    assert pipe.encoded == ["a red apple", "a red apple", "", "a red apple", "blurry"]  # no negative at scale 1


def test_distilled_defaults_and_seed_contract(folder: Path, table) -> None:
    """A step-distilled folder: 4 steps without CFG by default (diffusers ignores its guidance_scale there); row 1 of
    a batch of seed 7 is seed 8's image; a cfg_scale above 1 refused in one line."""
    oracle = diffusers_klein(folder, distilled=True)
    pipe = _ours(folder, table, distilled=True)
    assert pipe.family_defaults["steps"] == 4 and pipe.family_defaults["cfg_scale"] == 1.0
    got = pipe("a red apple", seed=7, width=W, height=H, batch_size=2).arrays
    for row, seed in enumerate((7, 8)):
        want = _diffusers(oracle, table, seed=seed, steps=4, scale=4.0)
        assert float(np.abs(got[row] - want).mean()) < 1e-4
    with pytest.raises(GenerationError, match=r"cfg_scale 2: klein-tiny is step-distilled") as e:
        pipe("a red apple", cfg_scale=2.0, seed=1, width=W, height=H)
    assert "\n" not in str(e.value)


def test_schedule_is_diffusers(folder: Path, table) -> None:
    """The sigmas of a call: diffusers' scheduler given linspace(1, 1/n, n) and compute_empirical_mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from sdengine.diffusion.flow import flow_grid

    pipe = _ours(folder, table)
    for steps, (w, h) in ((4, (W, H)), (28, (1024, 1024)), (50, (1536, 1536))):
        tokens = (w // 8) * (h // 8) if w == W else (w // 16) * (h // 16)
        assert empirical_mu(tokens, steps) == compute_empirical_mu(tokens, steps)
        f = pipe.vae_scale_factor if w == W else 16
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        sched.set_timesteps(
            sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu((w // f) * (h // f), steps)
        )
        ours = flow_grid(pipe.flow_schedule(w * 8 // f, h * 8 // f, steps), steps).sigmas
        assert torch.allclose(ours.float(), sched.sigmas.float(), atol=1e-6), (steps, w, h)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subseed_strength": 0.5, "subseed": 3}, "variation seeds are not supported for FLUX.2"),
        ({"distilled_cfg_scale": 3.5}, "distilled_cfg_scale (--guidance) is FLUX.1 [dev]'s"),
        ({"pag_scale": 2.0}, "perturbed-attention guidance"),
        ({"enable_hr": True}, "the hires fix is not supported for FLUX.2"),
        ({"width": 44}, "multiple of 8"),
        ({"clip_skip": 2}, "clip_skip 2 does not apply to FLUX.2 (its text is Qwen3's, no CLIP)"),
        ({"shift": 3.0}, "FLUX.2 shifts its schedule by the image size and the step count"),
        ({"ip_adapters": [object()]}, "IP-Adapters are not supported for FLUX.2"),
    ],
)
def test_refusals(folder: Path, table, kwargs: dict, message: str) -> None:
    pipe = _ours(folder, table)
    args = {"prompt": "a red apple", "seed": 1, "width": W, "height": H, "steps": 2, **kwargs}
    with pytest.raises(GenerationError) as e:
        pipe(**args)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert pipe.encoded == []  # refused before any model ran


def _picture(w: int, h: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_reference_images_match_diffusers(folder: Path, table) -> None:
    """klein edit: two reference images (75x66 and 100x64, centre-cropped to multiples of 8 here) as diffusers'
    ``image=`` list, with CFG; then one reference and no size given (the output takes its fitted 72x64)."""
    oracle = diffusers_klein(folder)
    pipe = _ours(folder, table)
    refs = [_picture(75, 66, 1), _picture(100, 64, 2)]
    for images, size in ((refs, {"width": W, "height": H}), (refs[:1], {})):
        want = oracle(
            image=list(images),
            prompt_embeds=table["a red apple"],
            negative_prompt_embeds=table[""],
            guidance_scale=2.5,
            num_inference_steps=3,
            generator=torch.Generator("cpu").manual_seed(5),
            max_sequence_length=TEXT,
            output_type="np",
            **size,
        ).images[0]
        result = pipe("a red apple", cfg_scale=2.5, steps=3, seed=5, reference_images=list(images), **size)
        got = result.arrays[0]
        assert got.shape == want.shape == ((H, W, 3) if size else (64, 72, 3))
        assert float(np.abs(got - want).mean()) < 1e-4
    plain = pipe("a red apple", cfg_scale=2.5, steps=3, seed=5, width=72, height=64).arrays[0]
    assert float(np.abs(plain - got).mean()) > 1e-3  # the reference changed the image


def test_reference_fitting_rules() -> None:
    """diffusers' Flux2ImageProcessor: a reference over 1024^2 pixels resized to about that area (its sizes), too
    small or too elongated ones refused in one line."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    from sdengine.pipeline.flux2_references import fit, fitted_size

    big = _picture(1500, 900, 3)
    want = Flux2ImageProcessor._resize_to_target_area(big, 1024 * 1024)
    resized, cropped = fitted_size(1500, 900, 16)
    assert resized == want.size and cropped == (want.width // 16 * 16, want.height // 16 * 16)
    assert fit(big, 16).size == cropped
    for w, h, message in ((63, 100, "at least 64 pixels a side"), (900, 100, "aspect ratios up to 8:1")):
        with pytest.raises(GenerationError, match=message):
            fitted_size(w, h, 16)
