"""End-to-end: sdengine's Pipeline against diffusers' StableDiffusion(Img2Img|Inpaint)Pipeline on the same tiny
random weights (a diffusers folder), fp32 CPU, batch 1, same prompt/negative/seed/steps/guidance/size and the
scheduler sdengine's sampler table names. The medium-size versions are in test_pipeline_slow.py.

Known differences from diffusers, on purpose (so those combinations are not compared):
* PLMS and LMS img2img / inpainting at strength < 1: diffusers' PNDM evaluates the network at timestep
  t_{k+1} on the sample of t_k after its first-step redo when its timestep list ``[t0, t1, t1, t2, ...]`` is
  sliced; its LMS takes the Lagrange coefficient of the full-history order for the first derivative. sdengine
  runs the same multistep rules from the start point (as k-diffusion does); at strength 1 both agree.
* DPM++ SDE: diffusers draws its noise from a torchsde Brownian tree; the test hands it per-step draws from
  the same generator, which is sdengine's seed contract (docs/CONTRACTS.md, Seeds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import (  # noqa: E402
    diffusers_pipeline,
    diffusers_scheduler,
    mask_picture,
    picture,
)
from sdengine.diffusion.sampling import SAMPLERS  # noqa: E402
from sdengine.pipeline import Cancelled, GenerationError, Pipeline, StepInfo  # noqa: E402

TOL = 1e-3  # mean absolute difference on 0..1 pixels (docs/CONTRACTS.md, Test oracles); seen: ~2e-7
SIZE = 32  # tiny VAE: 2x, so a 16x16 latent
STEPS = 6
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED = 3

# the samplers diffusers has (DPM++ 2S a and 3M SDE have no diffusers scheduler: test_samplers_extra.py checks them)
DETERMINISTIC = [n for n, s in SAMPLERS.items() if not s.stochastic and s.parity_schedules]
STOCHASTIC = [n for n, s in SAMPLERS.items() if s.stochastic and s.parity_schedules]
IMG2IMG = [n for n in DETERMINISTIC if n not in ("plms", "lms")]  # see the module docstring


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    folder = tiny_sd1_folder
    return folder, sdengine.load_pipeline(folder, device="cpu")


@pytest.fixture(scope="module")
def ref_txt2img(sd1):
    return diffusers_pipeline(sd1[0])


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _ours(pipe: Pipeline, sampler: str, **kw):
    args = dict(
        steps=STEPS,
        sampler=sampler,
        schedule="normal",
        cfg_scale=7.5,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
    )
    args.update(kw)
    return pipe(PROMPT, NEGATIVE, **args)


def _theirs(ref, folder, sampler: str, **kw):
    ref.scheduler = diffusers_scheduler(folder, sampler)
    gen = torch.Generator("cpu").manual_seed(kw.pop("seed", SEED))
    if sampler == "dpmpp_sde":  # per-step noise from the pipeline's generator instead of torchsde
        sched, set_timesteps = ref.scheduler, ref.scheduler.set_timesteps

        def patched(*a, **k):
            set_timesteps(*a, **k)
            sched.noise_sampler = lambda _s, _t: torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=gen)

        sched.set_timesteps = patched
    args = dict(
        negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, generator=gen, output_type="np"
    )
    args.update(kw)
    return ref(None if "prompt_embeds" in args else PROMPT, **args).images


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("sampler", DETERMINISTIC + STOCHASTIC)
def test_txt2img_matches_diffusers(sd1, ref_txt2img, sampler):
    folder, pipe = sd1
    ours = _ours(pipe, sampler).arrays
    theirs = _theirs(ref_txt2img, folder, sampler, width=SIZE, height=SIZE)
    assert ours.std() > 0.05  # a real picture, not a saturated one
    assert _mad(ours, theirs) < TOL


@pytest.fixture(scope="module")
def ref_img2img(sd1):
    return diffusers_pipeline(sd1[0], img2img=True)


@pytest.fixture(scope="module")
def ref_inpaint4(sd1):
    return diffusers_pipeline(sd1[0], "inpaint4")


def _slow_except(fast: set, values: list) -> list:
    """Parameters: those in ``fast`` run in the fast suite, the others are marked slow."""
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


@pytest.mark.parametrize("strength", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("sampler", _slow_except({"euler"}, IMG2IMG + ["euler_a", "dpmpp_2m_sde"]))
def test_img2img_matches_diffusers(sd1, ref_img2img, sampler, strength):
    folder, pipe = sd1
    ref = ref_img2img
    init = picture(SIZE, SIZE)
    ours = _ours(pipe, sampler, init_image=init, strength=strength, steps=10).arrays
    theirs = _theirs(ref, folder, sampler, image=init, strength=strength, num_inference_steps=10)
    assert _mad(ours, theirs) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["plms", "lms"])
def test_img2img_multistep_at_full_strength_matches_diffusers(sd1, ref_img2img, sampler):
    folder, pipe = sd1
    ref = ref_img2img
    init = picture(SIZE, SIZE)
    ours = _ours(pipe, sampler, init_image=init, strength=1.0).arrays
    assert _mad(ours, _theirs(ref, folder, sampler, image=init, strength=1.0)) < TOL


@pytest.fixture(scope="module")
def inpaint9(tiny_inpaint_folder):
    folder = tiny_inpaint_folder
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_pipeline(folder, "inpaint")


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", _slow_except({"euler"}, ["plms", "euler", "dpmpp_2m"]))
def test_inpaint_9_channel_matches_diffusers(inpaint9, sampler, strength):
    if sampler == "plms" and strength < 1:
        pytest.skip("diffusers' PNDM img2img quirk (module docstring)")
    folder, pipe, ref = inpaint9
    assert pipe.inpainting
    img, mask = picture(SIZE, SIZE), mask_picture(SIZE, SIZE)
    ours = _ours(pipe, sampler, init_image=img, mask=mask, strength=strength).arrays
    theirs = _theirs(ref, folder, sampler, image=img, mask_image=mask, strength=strength, width=SIZE, height=SIZE)
    assert _mad(ours, theirs) < TOL


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize(
    "sampler", _slow_except({"dpmpp_2m"}, ["plms", "euler", "heun", "dpmpp_2m", "unipc", "euler_a"])
)
def test_inpaint_blended_4_channel_matches_diffusers(sd1, ref_inpaint4, sampler, strength):
    """An ordinary U-Net: the known region is blended back after each step, as diffusers' inpaint pipeline."""
    if sampler == "plms" and strength < 1:
        pytest.skip("diffusers' PNDM img2img quirk (module docstring)")
    folder, pipe = sd1
    ref = ref_inpaint4
    img, mask = picture(SIZE, SIZE), mask_picture(SIZE, SIZE)
    ours = _ours(pipe, sampler, init_image=img, mask=mask, strength=strength).arrays
    theirs = _theirs(ref, folder, sampler, image=img, mask_image=mask, strength=strength, width=SIZE, height=SIZE)
    assert _mad(ours, theirs) < TOL


@pytest.fixture(scope="module")
def sd2(tiny_sd2_folder):
    folder = tiny_sd2_folder
    return folder, sdengine.load_pipeline(folder, device="cpu")


@pytest.mark.parametrize("sampler", _slow_except({"ddim"}, ["ddim", "euler", "dpmpp_2m"]))
def test_sd2_v_prediction_matches_diffusers(sd2, sampler):
    folder, pipe = sd2
    assert pipe.prediction_type == "v_prediction" and pipe.pad_token_id == 0
    ours = _ours(pipe, sampler).arrays
    assert _mad(ours, _theirs(diffusers_pipeline(folder), folder, sampler, width=SIZE, height=SIZE)) < TOL


def test_guidance_rescale_matches_diffusers(sd1, ref_txt2img):
    folder, pipe = sd1
    ours = _ours(pipe, "euler", guidance_rescale=0.7).arrays
    assert _mad(ours, _theirs(ref_txt2img, folder, "euler", guidance_rescale=0.7, width=SIZE, height=SIZE)) < TOL
    assert _mad(ours, _ours(pipe, "euler").arrays) > 1e-3


def test_clip_skip_matches_diffusers_text_states(sd1, ref_txt2img):
    """A1111's clip skip 2 = the second-to-last layer, final LayerNorm applied (diffusers' clip_skip=1). diffusers
    0.42 reaches for ``text_encoder.text_model``, which transformers 5 no longer has, so the states are made here
    the way diffusers makes them and handed over as prompt_embeds."""
    folder, pipe = sd1
    te, tok = ref_txt2img.text_encoder, ref_txt2img.tokenizer

    def states(text: str) -> torch.Tensor:
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = te(ids, output_hidden_states=True).hidden_states[-2]
            return getattr(te, "text_model", te).final_layer_norm(hidden)

    ours = _ours(pipe, "euler", clip_skip=2).arrays
    theirs = _theirs(
        ref_txt2img,
        folder,
        "euler",
        prompt_embeds=states(PROMPT),
        negative_prompt_embeds=states(NEGATIVE),
        negative_prompt=None,
        width=SIZE,
        height=SIZE,
    )
    assert _mad(ours, theirs) < TOL
    assert _mad(ours, _ours(pipe, "euler").arrays) > 1e-3


def test_cfg_scale_one_skips_the_unconditional_pass_and_matches_diffusers(sd1, ref_txt2img, monkeypatch):
    folder, pipe = sd1
    rows = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: rows.append(x.shape[0]) or forward(x, *a, **k))
    ours = _ours(pipe, "euler", cfg_scale=1.0).arrays
    assert rows == [1] * STEPS
    rows.clear()
    _ours(pipe, "euler", cfg_scale=7.5)
    assert rows == [2] * STEPS  # cond and uncond in one batched call
    monkeypatch.undo()
    assert _mad(ours, _theirs(ref_txt2img, folder, "euler", guidance_scale=1.0, width=SIZE, height=SIZE)) < TOL


# ------------------------------------------------------------------------------------------ seeds


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_an_image_of_a_batch_of_4_equals_the_same_seed_alone(sd1, sampler):
    _, pipe = sd1
    batch = _ours(pipe, sampler, batch_size=4, seed=100)
    assert batch.seeds == [100, 101, 102, 103] and len(batch.images) == 4
    for i in (0, 2):
        alone = _ours(pipe, sampler, seed=100 + i)
        np.testing.assert_allclose(batch.arrays[i], alone.arrays[0], rtol=0, atol=1e-5)
    assert _mad(batch.arrays[0], batch.arrays[1]) > 1e-3


def test_img2img_batch_rows_are_independent(sd1):
    _, pipe = sd1
    init = picture(SIZE, SIZE)
    batch = _ours(pipe, "euler_a", batch_size=3, seed=7, init_image=init, strength=0.6)
    alone = _ours(pipe, "euler_a", seed=8, init_image=init, strength=0.6)
    np.testing.assert_allclose(batch.arrays[1], alone.arrays[0], rtol=0, atol=1e-5)


def test_random_seed_is_recorded(sd1):
    _, pipe = sd1
    r = _ours(pipe, "euler", seed=None, steps=1)
    again = _ours(pipe, "euler", seed=r.seeds[0], steps=1)
    np.testing.assert_array_equal(r.arrays, again.arrays)
    assert r.parameters["seed"] == r.seeds[0]


def test_seeds_that_agree_modulo_2_to_32_give_one_image_and_say_so(sd1):
    """torch's CPU generator keeps a seed's low 32 bits (docs/CONTRACTS.md, Seeds): seed 2**32 + 5 is seed 5's
    image, as in diffusers; the generation says so instead of leaving the user to find out."""
    _, pipe = sd1
    low = _ours(pipe, "euler", seed=5, steps=1)
    high = _ours(pipe, "euler", seed=2**32 + 5, steps=1)
    np.testing.assert_array_equal(high.arrays, low.arrays)
    assert any("seed 4294967301 draws the same noise as seed 5" in n for n in high.notes), high.notes
    assert not any("low 32 bits" in n for n in low.notes)


def test_a_wide_seed_note_is_true_for_the_brownian_tree_of_a1111s_sde_noise(sd1):
    """Under A1111's rules the SDE samplers read a Brownian tree that takes the whole seed: seed 2**32 + 5 starts
    from seed 5's noise but gives another image, and the note says so (it once said the two give one image)."""
    _, pipe = sd1
    kw = dict(steps=2, strength_rule="a1111")
    low = _ours(pipe, "dpmpp_2m_sde", seed=5, **kw)
    high = _ours(pipe, "dpmpp_2m_sde", seed=2**32 + 5, **kw)
    assert np.abs(high.arrays.astype(int) - low.arrays.astype(int)).max() > 0
    assert not any("give one image" in n for n in high.notes), high.notes
    said = "seed 4294967301 starts from the same noise as seed 5"
    assert any(said in n and "different images" in n for n in high.notes), high.notes
    plain = _ours(pipe, "dpmpp_2m_sde", seed=2**32 + 5, steps=2)  # sdengine's rule: the rows' generators
    np.testing.assert_array_equal(plain.arrays, _ours(pipe, "dpmpp_2m_sde", seed=5, steps=2).arrays)
    assert any("give one image" in n for n in plain.notes), plain.notes


def test_sampler_options_are_written_and_read_back(sd1):
    """``sampler_options`` change the image and A1111 has no field for most of them: sdengine writes "Sampler
    options" (JSON) and reads it back, so the infotext alone regenerates the image (it once did not); an ``eta``
    is written as A1111's own "Eta" field (it was in "Sampler options", which A1111 does not read)."""
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    _, pipe = sd1
    r = _ours(pipe, "euler_a", sampler_options={"eta": 0.4})
    assert "Eta: 0.4," in r.infotexts[0] and "Sampler options" not in r.infotexts[0], r.infotexts[0]  # A1111's
    kwargs = to_generate_kwargs(parse_parameters(r.infotexts[0]))
    assert kwargs["sampler_options"] == {"eta": 0.4}
    again = pipe(**kwargs, progress=False)
    np.testing.assert_array_equal(again.arrays, r.arrays)
    assert not np.array_equal(_ours(pipe, "euler_a").arrays, r.arrays)  # the option matters


def test_noise_multiplier_scales_the_noise_added_to_the_init_image_as_a1111(sd1, monkeypatch):
    """A1111's img2img "Noise multiplier" (``initial_noise_multiplier``): the start noise the sampler adds to the
    init latent is the drawn noise times it; written as A1111 writes it and read back. A txt2img call with one is
    refused (there is no init latent to add it to)."""
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    _, pipe = sd1
    seen = []
    run = pipe.sample_plan

    def spy(den, plan, noise, init_latent, cond, **kw):
        seen.append((noise.clone(), init_latent))
        return run(den, plan, noise, init_latent, cond, **kw)

    monkeypatch.setattr(pipe, "sample_plan", spy)
    init = picture(SIZE, SIZE)
    kw = dict(init_image=init, strength=0.6, seed=1)
    plain = _ours(pipe, "euler", **kw)
    r = _ours(pipe, "euler", noise_multiplier=0.8, **kw)
    assert seen[0][1] is not None and torch.equal(seen[0][1], seen[1][1])  # the same init latent
    torch.testing.assert_close(seen[1][0], seen[0][0] * 0.8, rtol=0, atol=0)
    assert not np.array_equal(r.arrays, plain.arrays)
    assert "Noise multiplier: 0.8," in r.infotexts[0] and "Noise multiplier" not in plain.infotexts[0]
    kwargs = to_generate_kwargs(parse_parameters(r.infotexts[0]))
    assert kwargs["noise_multiplier"] == 0.8
    np.testing.assert_array_equal(pipe(**kwargs, init_image=init, progress=False).arrays, r.arrays)
    with pytest.raises(GenerationError, match="noise_multiplier 0.8 scales the noise added to an init image"):
        _ours(pipe, "euler", noise_multiplier=0.8)
    with pytest.raises(GenerationError, match=r"noise_multiplier must be a number in \[0, 10\]"):
        _ours(pipe, "euler", noise_multiplier=-1, **kw)


def test_noise_seed_delta_reseeds_the_step_noise_as_a1111s_ensd(sd1, monkeypatch):
    """A1111's ENSD (eta_noise_seed_delta): the start noise from the seed, then every row's generator seeded again
    with seed + delta for the per-step noise; "ENSD" written for a sampler that draws such noise, and read back.
    A deterministic sampler's image does not change."""
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    _, pipe = sd1
    seen = []
    run = pipe.sample_plan

    def spy(den, plan, noise, init_latent, cond, *, generators=None, **kw):
        seen.append((noise.clone(), [g.get_state() for g in generators]))
        return run(den, plan, noise, init_latent, cond, generators=generators, **kw)

    monkeypatch.setattr(pipe, "sample_plan", spy)
    plain = _ours(pipe, "euler_a", seed=7, batch_size=2)
    r = _ours(pipe, "euler_a", seed=7, batch_size=2, noise_seed_delta=31337)
    torch.testing.assert_close(seen[1][0], seen[0][0], rtol=0, atol=0)  # the same start noise
    for k, state in enumerate(seen[1][1]):  # row k's step noise from seed 7 + k + 31337
        assert torch.equal(state, torch.Generator().manual_seed(7 + k + 31337).get_state())
    assert np.abs(r.arrays - plain.arrays).max() > 1e-2
    assert "ENSD: 31337," in r.infotexts[0] and "ENSD" not in plain.infotexts[0]
    kwargs = to_generate_kwargs(parse_parameters(r.infotexts[0]))
    assert kwargs["noise_seed_delta"] == 31337
    np.testing.assert_allclose(pipe(**kwargs, progress=False).arrays, r.arrays[:1], rtol=0, atol=1e-5)  # row 0
    same = _ours(pipe, "euler", seed=7, noise_seed_delta=31337)
    np.testing.assert_array_equal(same.arrays, _ours(pipe, "euler", seed=7).arrays)
    assert "ENSD" not in same.infotexts[0]
    with pytest.raises(GenerationError, match=r"noise_seed_delta must be an integer in \[0, 4294967295\]"):
        _ours(pipe, "euler_a", noise_seed_delta=-1)


def test_masked_content_latent_noise_and_nothing_as_a1111(sd1, monkeypatch):
    """A1111's inpainting "latent noise" / "latent nothing" (inpainting_fill 2 / 3): the init latent is the row's
    unit noise / zeros where the latent mask repaints, the init image's latent elsewhere; written as sdengine's
    "Masked content" and read back; without a mask, or an unknown name, one line."""
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    _, pipe = sd1
    seen = []
    run = pipe.sample_plan

    def spy(den, plan, noise, init_latent, cond, **kw):
        seen.append((noise.clone(), init_latent.clone()))
        return run(den, plan, noise, init_latent, cond, **kw)

    monkeypatch.setattr(pipe, "sample_plan", spy)
    init = picture(SIZE, SIZE)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, : SIZE // 2] = 1.0  # the left half, on the latent grid
    kw = dict(init_image=init, mask=mask, strength=0.7, seed=2)
    plain = _ours(pipe, "euler", **kw)
    results = {m: _ours(pipe, "euler", masked_content=m, **kw) for m in ("latent noise", "latent nothing")}
    (noise, original), (_, noised), (_, nothing) = seen
    half = original.shape[-1] // 2
    torch.testing.assert_close(noised[..., :half], noise[..., :half], rtol=0, atol=0)
    torch.testing.assert_close(noised[..., half:], original[..., half:], rtol=0, atol=0)
    assert torch.count_nonzero(nothing[..., :half]) == 0
    torch.testing.assert_close(nothing[..., half:], original[..., half:], rtol=0, atol=0)
    for m, r in results.items():
        assert not np.array_equal(r.arrays, plain.arrays)
        assert f"Masked content: {m}," in r.infotexts[0] and "Masked content" not in plain.infotexts[0]
        assert to_generate_kwargs(parse_parameters(r.infotexts[0]))["masked_content"] == m
    with pytest.raises(GenerationError, match="masked_content 'latent noise' needs a mask"):
        _ours(pipe, "euler", init_image=init, masked_content="latent noise")
    with pytest.raises(GenerationError, match="unknown masked_content 'fill'; use one of: original, latent noise"):
        _ours(pipe, "euler", masked_content="fill", **kw)


# ------------------------------------------------------------------------------------------ prompts


def test_negative_prompt_and_long_prompts(sd1):
    _, pipe = sd1
    base = _ours(pipe, "euler", steps=2).arrays
    other = pipe(
        PROMPT, "", steps=2, sampler="euler", cfg_scale=7.5, seed=SEED, width=SIZE, height=SIZE, progress=False
    ).arrays
    assert _mad(base, other) > 1e-4
    long = ", ".join(["a red apple"] * 30)  # 119 tokens: two chunks, nothing cut
    cond, uncond = pipe.encode_prompt(long, "")
    assert cond.shape == uncond.shape and cond.shape[1] == 2 * 77
    cut = ", ".join(["a red apple"] * 18)
    assert pipe.encode_prompt(cut, "")[0].shape[1] == 77
    a = pipe(long, steps=2, sampler="euler", seed=1, width=SIZE, height=SIZE, progress=False).arrays
    b = pipe(cut, steps=2, sampler="euler", seed=1, width=SIZE, height=SIZE, progress=False).arrays
    assert _mad(a, b) > 1e-6


def test_empty_prompt_is_valid(sd1):
    _, pipe = sd1
    r = pipe("", steps=1, sampler="euler", seed=0, width=SIZE, height=SIZE, progress=False)
    assert r.arrays.shape == (1, SIZE, SIZE, 3) and r.parameters["prompt"] == ""


# ------------------------------------------------------------------------------------------ result


def test_result_images_arrays_parameters(sd1):
    _, pipe = sd1
    r = _ours(pipe, "dpmpp_2m", schedule="karras", batch_size=2, seed=42)
    assert [im.size for im in r.images] == [(SIZE, SIZE)] * 2 and r.images[0].mode == "RGB"
    assert r.arrays.dtype == np.float32 and r.arrays.shape == (2, SIZE, SIZE, 3)
    assert 0 <= r.arrays.min() and r.arrays.max() <= 1
    np.testing.assert_array_equal(np.asarray(r.images[1]), (r.arrays[1] * 255).round().astype(np.uint8))
    p = r.parameters
    assert (p["sampler"], p["schedule"], p["steps"], p["cfg_scale"], p["seed"]) == (
        "dpmpp_2m",
        "karras",
        STEPS,
        7.5,
        42,
    )
    assert (p["width"], p["height"], p["prompt"], p["negative_prompt"]) == (SIZE, SIZE, PROMPT, NEGATIVE)
    assert len(p["model_hash"]) == 10
    assert "Seed: 43," in r.infotexts[1] and "Sampler: DPM++ 2M, Schedule type: Karras" in r.infotexts[0]


def test_a1111_sampler_names(sd1):
    _, pipe = sd1
    a = _ours(pipe, "DPM++ 2M Karras", schedule=None, steps=2)
    b = _ours(pipe, "dpmpp_2m", schedule="karras", steps=2)
    np.testing.assert_array_equal(a.arrays, b.arrays)
    assert a.parameters["sampler"] == "dpmpp_2m" and a.parameters["schedule"] == "karras"


# ------------------------------------------------------------------------------------------ callback


def test_callback_sees_every_step_with_a_preview(sd1):
    _, pipe = sd1
    seen: list[StepInfo] = []
    _ours(pipe, "euler", callback=seen.append)
    assert [s.step for s in seen] == list(range(1, STEPS + 1)) and seen[0].steps == STEPS
    prev = seen[-1].preview()
    assert prev.dtype == np.uint8 and prev.shape == (1, SIZE // 2, SIZE // 2, 3)
    assert seen[-1].preview_images()[0].size == (SIZE // 2, SIZE // 2)


def test_step_preview_array_is_named_for_what_it_is(sd1):
    _, pipe = sd1
    seen: list[StepInfo] = []
    _ours(pipe, "euler", callback=seen.append)
    arr = seen[-1].preview_array()
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == (1, SIZE // 2, SIZE // 2, 3)
    np.testing.assert_array_equal(arr, seen[-1].preview())  # the old name is kept
    images = seen[-1].preview_images()
    assert len(images) == 1 and images[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(images[0]), arr[0])
    assert "preview_images" in (StepInfo.__doc__ or "") and "not an image" in (StepInfo.preview_array.__doc__ or "")


def test_img2img_callback_counts_the_steps_that_run(sd1):
    _, pipe = sd1
    seen = []
    _ours(pipe, "euler", steps=10, init_image=picture(SIZE, SIZE), strength=0.3, callback=seen.append)
    assert [s.step for s in seen] == [1, 2, 3] and seen[0].steps == 3


def test_cancel_from_the_callback(sd1):
    _, pipe = sd1
    with pytest.raises(Cancelled) as e:
        _ours(pipe, "dpmpp_2m", callback=lambda info: info.step < 2)
    assert e.value.step == 2 and e.value.steps == STEPS and e.value.preview.shape == (1, SIZE // 2, SIZE // 2, 3)
    # the pipeline is usable afterwards
    assert _ours(pipe, "euler", steps=1).arrays.shape == (1, SIZE, SIZE, 3)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(width=100), "width 100 is not a multiple of 8; the nearest valid width is 104"),
        (dict(height=60), "height 60 is not a multiple of 8; the nearest valid height is 64"),
        (dict(width=4), "width 4 is not a multiple of 8; the nearest valid width is 8"),
        (dict(width=513), "width 513 is not a multiple of 8; the nearest valid width is 512"),
        (dict(width=0), "width must be positive"),
        (dict(height=-64), "height must be positive"),
        (dict(strength=0.0), "strength must be in (0, 1]"),
        (dict(strength=1.5), "strength must be in (0, 1]"),
        (dict(cfg_scale=-1.0), "cfg_scale must be a number >= 0"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(sampler="nope"), "unknown sampler 'nope'"),
        (dict(sampler="plms", schedule="karras"), "cannot use schedule 'karras'"),
        (dict(guidance_rescale=2.0), "guidance_rescale must be in [0, 1]"),
        (dict(clip_skip=9), "clip_skip must be an integer in 1..3"),
        (dict(mask=np.ones((SIZE, SIZE))), "a mask needs an init_image"),
        (dict(steps=2, strength=0.3, init_image=np.zeros((SIZE, SIZE, 3))), "runs no step"),
    ],
)
def test_bad_input_is_one_clear_error(sd1, kw, message):
    _, pipe = sd1
    args = dict(steps=2, sampler="euler", seed=0, width=SIZE, height=SIZE, progress=False)
    args.update(kw)
    with pytest.raises(GenerationError) as e:
        pipe("x", **args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_images_are_named(sd1, tmp_path):
    _, pipe = sd1
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    args = dict(steps=2, sampler="euler", seed=0, width=SIZE, height=SIZE, progress=False)
    with pytest.raises(GenerationError, match="cannot read the init image .*broken.png"):
        pipe("x", init_image=bad, **args)
    with pytest.raises(GenerationError, match="mask not found: .*missing.png"):
        pipe("x", init_image=picture(SIZE, SIZE), mask=tmp_path / "missing.png", **args)


def test_a_mask_of_another_size_is_resized_and_said(sd1, caplog):
    _, pipe = sd1
    r = _ours(pipe, "euler", steps=2, init_image=picture(SIZE, SIZE), mask=mask_picture(48, 40), strength=1.0)
    assert r.notes == [f"mask 48x40 resized to {SIZE}x{SIZE} (the image size)"]
    assert "mask 48x40 resized" in caplog.text


def test_an_init_image_of_another_size_is_resized(sd1):
    _, pipe = sd1
    r = _ours(pipe, "euler", steps=4, init_image=picture(50, 70), strength=0.5)
    assert r.arrays.shape == (1, SIZE, SIZE, 3)


def test_too_large_for_memory_is_refused_before_allocating(sd1, monkeypatch):
    _, pipe = sd1
    import sdengine.vae_utils as vu

    monkeypatch.setattr(vu, "available_memory", lambda device: 64 * 2**20)
    called = []
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: called.append(1))
    with pytest.raises(GenerationError, match=r"4096x4096 x 1 needs about .* GiB on cpu, only 0.1 GiB is free"):
        pipe("x", width=4096, height=4096, steps=1, progress=False)
    assert not called
    assert pipe.estimate_memory(512, 512, 1, cfg=True, tiled=False) < pipe.estimate_memory(
        1024, 1024, 1, cfg=True, tiled=False
    )


def test_mask_blur_softens_the_blend(sd1):
    _, pipe = sd1
    args = dict(steps=4, init_image=picture(SIZE, SIZE), mask=mask_picture(SIZE, SIZE), strength=1.0)
    hard = _ours(pipe, "euler", **args)
    soft = _ours(pipe, "euler", mask_blur=4, **args)
    assert _mad(hard.arrays, soft.arrays) > 1e-4
    assert "Mask blur: 4" in soft.infotexts[0]


# ------------------------------------------------------------------------------------------ loading


def test_builtin_names(tmp_path, monkeypatch):
    import sdengine.pipeline as pipeline_module

    monkeypatch.setitem(pipeline_module.BUILTIN_SD, "emoji", tmp_path / "not-shipped")
    with pytest.raises(GenerationError, match="'emoji' has not been trained yet.*sdengine train emoji"):
        sdengine.load_pipeline("emoji")
    with pytest.raises(GenerationError, match="no model at"):
        sdengine.load_pipeline(tmp_path / "nothing")


def test_device_and_dtype_defaults():
    from sdengine.pipeline import resolve_device, resolve_dtype

    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else dev.type)
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(GenerationError, match="unknown dtype"):
        resolve_dtype("fp8", dev)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_single_file_loads_and_matches_the_folder(sd1, tmp_path):
    from sdengine.weights import convert

    folder, pipe = sd1
    single = convert(folder, tmp_path / "model.safetensors")
    other = sdengine.load_pipeline(single, device="cpu")
    a = _ours(pipe, "euler", steps=2).arrays
    np.testing.assert_allclose(_ours(other, "euler", steps=2).arrays, a, rtol=0, atol=1e-6)


def test_pixel_ddpm_folder_takes_a_class_name(tmp_path):
    import dataclasses

    from sdengine.ddpm import PixelDDPM
    from sdengine.models.unet import TINY_PIXEL, UNet

    cfg = dataclasses.replace(TINY_PIXEL, in_channels=1, out_channels=1, num_class_embeds=3)
    torch.manual_seed(0)
    PixelDDPM(
        unet=UNet(cfg),
        schedule_config={"beta_schedule": "linear"},
        prediction="epsilon",
        image_size=16,
        channels=1,
        class_names=["cat", "dog"],
    ).save(tmp_path / "px")
    pipe = sdengine.load_pipeline(tmp_path / "px", device="cpu")
    r = pipe("Dog", steps=2, sampler="ddim", seed=1, batch_size=2, cfg_scale=2.0, progress=False)
    assert r.arrays.shape == (2, 16, 16, 3) and r.seeds == [1, 2] and "Seed: 2" in r.infotexts[1]
    alone = pipe("dog", steps=2, sampler="ddim", seed=2, cfg_scale=2.0, progress=False)
    np.testing.assert_allclose(r.arrays[1], alone.arrays[0], atol=1e-5)
    with pytest.raises(GenerationError, match="unknown class 'bird'; classes: cat, dog"):
        pipe("bird", steps=1)
    with pytest.raises(GenerationError, match="pixel DDPM: it does not take init_image"):
        pipe("cat", steps=1, init_image=picture(16, 16))


def test_progress_bar_shows_steps_rate_and_eta(sd1, capsys):
    _, pipe = sd1
    _ours(pipe, "euler", steps=3, progress=True)
    err = capsys.readouterr().err
    assert "sampling" in err and "/3 [" in err and "step/s" in err and "<" in err  # n/total [elapsed<ETA, rate]


def test_result_save_writes_pngs_with_their_parameters(tmp_path):
    from PIL import Image

    from sdengine import GenerationResult
    from sdengine.metadata import read_png_parameters

    texts = [f"a cat\nSteps: 2, Sampler: Euler, Seed: {s}, Size: 8x8" for s in (5, 6)]
    images = [Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(2)]
    result = GenerationResult(images, np.zeros((2, 8, 8, 3), np.float32), {"prompt": "a cat"}, [5, 6], texts)
    paths = result.save(tmp_path / "out")
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png"]
    assert [read_png_parameters(p) for p in paths] == texts
    assert [p.name for p in result.save(tmp_path / "out")] == ["00002-5.png", "00003-6.png"]  # numbering goes on
    assert "parameters" in (GenerationResult.save.__doc__ or "")


def test_package_exports_its_public_names():
    assert {"load_pipeline", "GenerationRequest", "GenerationResult", "Pipeline", "Cancelled"} <= set(sdengine.__all__)
    for name in sdengine.__all__:
        assert getattr(sdengine, name) is not None, name


LONG_NEGATIVE = ", ".join(["blurry, dark"] * 40)  # 119 tokens: two chunks against the prompt's one


def test_cfg_1_ignores_the_negative_prompt(sd1):
    # cfg 1 runs no unconditional pass; a negative of more chunks once padded the prompt's states to its length,
    # so it still changed the image (diffusers, ComfyUI and A1111 ignore the negative at cfg 1)
    _, pipe = sd1
    kw = dict(steps=3, sampler="euler", seed=SEED, width=SIZE, height=SIZE, cfg_scale=1.0, progress=False)
    plain = pipe(PROMPT, "", **kw)
    assert np.array_equal(pipe(PROMPT, LONG_NEGATIVE, **kw).arrays, plain.arrays)
    edited = pipe(f"[{PROMPT}:a pear:0.5]", "", **kw).arrays
    assert np.array_equal(pipe(f"[{PROMPT}:a pear:0.5]", f"[{LONG_NEGATIVE}|x]", **kw).arrays, edited)
    assert "Pad conds" not in pipe(PROMPT, LONG_NEGATIVE, **kw).infotexts[0]
    assert not np.array_equal(pipe(PROMPT, LONG_NEGATIVE, **{**kw, "cfg_scale": 3.0}).arrays, plain.arrays)


def test_padded_prompt_and_negative_are_written_as_a1111_pad_conds(sd1, caplog):
    # A1111 pads the shorter of cond and uncond with the empty prompt's chunks only with its "Pad prompt/negative
    # prompt" option, and then writes "Pad conds: True"; sdengine always pads, so it must say so for A1111 to
    # make the same image from the infotext
    import logging

    from sdengine.metadata import parse_parameters, to_generate_kwargs

    _, pipe = sd1
    kw = dict(steps=2, sampler="euler", seed=SEED, width=SIZE, height=SIZE, progress=False)
    r = pipe([PROMPT, PROMPT, "a BREAK b", f"[a:{LONG_NEGATIVE}:1]"], [LONG_NEGATIVE, "blurry", "c", "d"], **kw)
    assert ["Pad conds: True" in t for t in r.infotexts] == [True, False, True, True]
    assert "Pad conds" not in pipe(f"{PROMPT} BREAK x", "a BREAK b", **kw).infotexts[0]  # two chunks each
    with caplog.at_level(logging.WARNING, logger="sdengine.metadata"):
        assert to_generate_kwargs(parse_parameters(r.infotexts[0]))["negative_prompt"] == LONG_NEGATIVE
    assert not caplog.records  # sdengine reproduces the field: no "not reproduced" warning
