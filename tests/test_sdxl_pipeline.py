"""SDXL end to end against diffusers' StableDiffusionXLPipeline on a tiny random SDXL folder: loading,
conditioning (both encoders, pooled vector, micro-conditioning, force_zeros_for_empty_prompt) and images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_scheduler, mask_picture, picture  # noqa: E402
from _sdxl_models import diffusers_sdxl, make_sdxl_folder  # noqa: E402
from sdengine.diffusion.sampling import SAMPLERS  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline.sdxl import SDXLPipeline  # noqa: E402

TOL = 1e-3  # mean absolute difference on 0..1 pixels
SIZE = 32  # the tiny VAE is 2x: 16x16 latents, the tiny U-Net's sample_size
STEPS = 5
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED = 3


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """One folder for the base and the refiner: a server's models folder (the A1111 refiner tests)."""
    return tmp_path_factory.mktemp("sdxl")


@pytest.fixture(scope="module")
def base(models_dir):
    folder = make_sdxl_folder(models_dir / "tiny-sdxl")
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_sdxl(folder)


@pytest.fixture(scope="module")
def base_ref():
    """``base_ref(folder, **kind)``: diffusers' img2img / inpainting pipeline of a folder, built once per module
    (each test sets the scheduler it compares with)."""
    cache: dict = {}

    def get(folder, **kind):
        key = (str(folder), tuple(sorted(kind.items())))
        if key not in cache:
            cache[key] = diffusers_sdxl(folder, **kind)
        return cache[key]

    return get


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _ours(pipe, sampler: str, prompt: str = PROMPT, negative: str = NEGATIVE, **kw):
    args = dict(steps=STEPS, sampler=sampler, schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    args.update(kw)
    return pipe(prompt, negative, progress=False, **args)


def _theirs(ref, folder, sampler: str, prompt: str = PROMPT, **kw):
    ref.scheduler = diffusers_scheduler(folder, sampler)
    gen = torch.Generator("cpu").manual_seed(SEED)
    if sampler == "dpmpp_sde":  # per-step noise from the pipeline's generator instead of torchsde
        sched, set_timesteps = ref.scheduler, ref.scheduler.set_timesteps

        def patched(*a, **k):
            set_timesteps(*a, **k)
            sched.noise_sampler = lambda _s, _t: torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=gen)

        sched.set_timesteps = patched
    args = dict(
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=gen,
        output_type="np",
        width=SIZE,
        height=SIZE,
    )
    args.update(kw)
    return ref(prompt, **args).images


def test_loads_as_sdxl_base(base):
    folder, pipe, _ = base
    assert isinstance(pipe, SDXLPipeline) and not pipe.refiner
    assert pipe.text_kind == "sdxl"
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert pipe.default_size == SIZE  # the U-Net's sample size x the VAE factor (1024 for the real model)


def test_conditioning_equals_diffusers_encode_prompt(base):
    _, pipe, ref = base
    cond, uncond = pipe.conditioner.pair(PROMPT, NEGATIVE, width=SIZE, height=SIZE, options={"prompt_2": "a pear"})
    pe, ne, pp, npp = ref.encode_prompt(PROMPT, prompt_2="a pear", negative_prompt=NEGATIVE, device="cpu")
    assert cond["crossattn"].shape == pe.shape == (1, 77, 80)
    assert (cond["crossattn"] - pe).abs().max() <= 1e-5
    assert (uncond["crossattn"] - ne).abs().max() <= 1e-5
    assert (cond["vector"][:, :32] - pp).abs().max() <= 1e-5
    assert (uncond["vector"][:, :32] - npp).abs().max() <= 1e-5
    # force_zeros_for_empty_prompt: an empty negative is zeros (diffusers: negative_prompt=None)
    _, zero = pipe.conditioner.pair(PROMPT, "", width=SIZE, height=SIZE)
    _, ne0, _, npp0 = ref.encode_prompt(PROMPT, device="cpu")
    assert float(zero["crossattn"].abs().max()) == 0.0 and float(ne0.abs().max()) == 0.0
    assert float(zero["vector"][:, :32].abs().max()) == 0.0 and float(npp0.abs().max()) == 0.0


FAST = {"euler", "dpmpp_2m", "euler_a"}
ALL_SAMPLERS = [  # the samplers diffusers has
    s if s in FAST else pytest.param(s, marks=pytest.mark.slow) for s, spec in SAMPLERS.items() if spec.parity_schedules
]


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_txt2img_matches_diffusers(base, sampler):
    folder, pipe, ref = base
    ours = _ours(pipe, sampler).arrays
    theirs = _theirs(ref, folder, sampler)
    assert ours.std() > 0.02
    mad = _mad(ours, theirs)
    print(f"sdxl txt2img {sampler}: mean abs {mad:.2e}")
    assert mad < TOL


def test_micro_conditioning_and_empty_negative_match_diffusers(base):
    folder, pipe, ref = base
    sdxl = {"original_size": [64, 48], "crops_coords_top_left": [4, 8], "target_size": [32, 40]}
    ours = _ours(pipe, "euler", negative="", sdxl=sdxl).arrays
    theirs = _theirs(
        ref,
        folder,
        "euler",
        negative_prompt=None,
        original_size=(64, 48),
        crops_coords_top_left=(4, 8),
        target_size=(32, 40),
    )
    mad = _mad(ours, theirs)
    print(f"sdxl micro-conditioning: mean abs {mad:.2e}")
    assert mad < TOL
    # and the numbers matter: other sizes give another picture
    other = _ours(pipe, "euler", negative="").arrays
    assert _mad(ours, other) > 3 * TOL


def test_bad_sdxl_settings_are_one_clear_error(base, tiny_sd1_folder):
    _, pipe, _ = base
    with pytest.raises(GenerationError, match="original_size must be two integers"):
        _ours(pipe, "euler", sdxl={"original_size": [0, 5]})
    with pytest.raises(GenerationError, match="unknown sdxl settings: prompt3"):
        _ours(pipe, "euler", sdxl={"prompt3": "x"})
    sd1 = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(GenerationError, match="SDXL models only"):
        _ours(sd1, "euler", sdxl={"prompt_2": "x"})
    # prompt editing is not threaded through SDXL's two prompts and size conditioning yet: refused, not half right
    with pytest.raises(GenerationError, match="prompt editing .* not supported for SDXL"):
        _ours(pipe, "euler", prompt="a [cat:dog:0.5]")
    _ours(pipe, "euler", prompt="a (cat:1.2) [dog]", steps=1)  # emphasis still works


# ------------------------------------------------------------------------------------------ img2img


@pytest.fixture(scope="module")
def refiner(models_dir):
    folder = make_sdxl_folder(models_dir / "tiny-sdxl-refiner", refiner=True, seed=5)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_sdxl(folder, img2img=True)


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 0.6), ("dpmpp_2m", 0.3)])
def test_img2img_matches_diffusers(base, base_ref, sampler, strength):
    folder, pipe, _ = base
    ref = base_ref(folder, img2img=True)
    init = picture(SIZE, SIZE)
    ours = _ours(pipe, sampler, init_image=init, strength=strength, steps=8).arrays
    theirs = _theirs(ref, folder, sampler, image=init, strength=strength, num_inference_steps=8)
    mad = _mad(ours, theirs)
    print(f"sdxl img2img {sampler} {strength}: mean abs {mad:.2e}")
    assert mad < TOL


def test_refiner_loads_and_matches_diffusers_img2img(refiner):
    folder, pipe, ref = refiner
    assert isinstance(pipe, SDXLPipeline) and pipe.refiner and pipe.text_encoder is None
    init = picture(SIZE, SIZE, seed=2)
    sdxl = {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}
    ours = _ours(pipe, "euler", init_image=init, strength=0.3, steps=10, sdxl=sdxl).arrays
    theirs = _theirs(
        ref,
        folder,
        "euler",
        image=init,
        strength=0.3,
        num_inference_steps=10,
        aesthetic_score=7.0,
        negative_aesthetic_score=2.0,
    )
    mad = _mad(ours, theirs)
    print(f"sdxl refiner img2img euler 0.3: mean abs {mad:.2e}")
    assert mad < TOL


def test_refiner_reads_the_prompt_and_its_own_negative_crops_as_diffusers_does(refiner):
    """The refiner's one encoder reads the prompt (diffusers zips [prompt, prompt_2] with its one encoder; A1111
    too): prompt_2 once replaced it (2.7e-2 from diffusers). Its negative crops default to (0, 0) as in diffusers'
    img2img pipeline (once the positive crops, 8.2e-3). prompt_2 and a target size are said to be unused."""
    folder, pipe, ref = refiner
    init = picture(SIZE, SIZE, seed=2)
    sdxl = {"prompt_2": "oil painting", "negative_prompt_2": "ugly", "crops_coords_top_left": [4, 8]}
    r = _ours(pipe, "euler", init_image=init, strength=0.5, steps=6, sdxl={**sdxl, "target_size": [64, 64]})
    theirs = _theirs(
        ref, folder, "euler", image=init, strength=0.5, num_inference_steps=6, prompt_2="oil painting",
        negative_prompt_2="ugly", crops_coords_top_left=(4, 8),
    )  # fmt: skip
    mad = _mad(r.arrays, theirs)
    print(f"sdxl refiner prompt_2 + crops: mean abs {mad:.2e}")
    assert mad < 1e-4
    assert any("prompt_2, negative_prompt_2, target_size: not used by a refiner" in n for n in r.notes), r.notes


def test_an_aesthetic_score_given_to_the_base_model_is_said_to_be_unused(base):
    _, pipe, _ = base
    r = _ours(pipe, "euler", steps=2, sdxl={"aesthetic_score": 9.0})
    assert any("aesthetic_score: not used by a base model" in n for n in r.notes), r.notes
    assert not any("not used" in n for n in _ours(pipe, "euler", steps=2).notes)


# ------------------------------------------------------------------------------------------ base -> refiner


# unipc: its last steps before the switch once ran at the lower order of a grid's end (2e-4 from diffusers)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "unipc"])
def test_base_to_refiner_hand_off_matches_diffusers(base, refiner, sampler):
    b_folder, b_pipe, b_ref = base
    r_folder, r_pipe, r_ref = refiner
    res = b_pipe.generate_with_refiner(
        r_pipe,
        PROMPT,
        NEGATIVE,
        switch_at=0.7,
        steps=10,
        sampler=sampler,
        schedule="normal",
        cfg_scale=5.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
    )
    b_ref.scheduler = diffusers_scheduler(b_folder, sampler)
    r_ref.scheduler = diffusers_scheduler(r_folder, sampler)
    gen = torch.Generator("cpu").manual_seed(SEED)
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, generator=gen)
    latents = b_ref(PROMPT, width=SIZE, height=SIZE, denoising_end=0.7, output_type="latent", **common).images
    theirs = r_ref(PROMPT, image=latents, denoising_start=0.7, output_type="np", **common).images
    mad = _mad(res.arrays, theirs)
    print(f"sdxl base->refiner {sampler} switch 0.7: mean abs {mad:.2e}")
    assert mad < 1e-5
    assert "Refiner: tiny-sdxl-refiner" in res.infotexts[0] and "Refiner switch at: 0.7" in res.infotexts[0]
    # the refiner did work: the base alone to the end gives another picture
    assert _mad(res.arrays, _ours(b_pipe, sampler, steps=10).arrays) > 3 * TOL


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_img2img_hand_off_matches_diffusers(base, refiner, base_ref, sampler):
    """The hand-off from an init image (A1111 runs its refiner in img2img too; it was text-to-image only): the
    base's img2img up to the switch, the refiner from there, as diffusers' img2img base with ``strength`` and
    ``denoising_end`` then its refiner with ``denoising_start``."""
    b_folder, b_pipe, _ = base
    r_folder, r_pipe, r_ref = refiner
    init = picture(SIZE, SIZE, seed=4)
    kw = dict(steps=10, sampler=sampler, schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    res = b_pipe.generate_with_refiner(
        r_pipe, PROMPT, NEGATIVE, switch_at=0.7, init_image=init, strength=0.6, progress=False, **kw
    )
    b_i2i = base_ref(b_folder, img2img=True)
    b_i2i.scheduler = diffusers_scheduler(b_folder, sampler)
    r_ref.scheduler = diffusers_scheduler(r_folder, sampler)
    gen = torch.Generator("cpu").manual_seed(SEED)
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, generator=gen)
    latents = b_i2i(PROMPT, image=init, strength=0.6, denoising_end=0.7, output_type="latent", **common).images
    theirs = r_ref(PROMPT, image=latents, denoising_start=0.7, output_type="np", **common).images
    mad = _mad(res.arrays, theirs)
    print(f"sdxl img2img base->refiner {sampler} strength 0.6 switch 0.7: mean abs {mad:.2e}")
    assert mad < 1e-5
    assert "Denoising strength: 0.6" in res.infotexts[0] and "Refiner switch at: 0.7" in res.infotexts[0]
    alone = b_pipe(PROMPT, NEGATIVE, init_image=init, strength=0.6, progress=False, **kw)
    assert _mad(res.arrays, alone.arrays) > 3 * TOL


# the late switch does not depend on the sampler: Euler in `make test`, DPM++ 2M in `make test-all`
@pytest.mark.parametrize("sampler", ["euler", pytest.param("dpmpp_2m", marks=pytest.mark.slow)])
def test_img2img_hand_off_after_a_late_switch_runs_the_refiner_every_step(base, refiner, sampler):
    """A switch before the img2img's first step (steps 9..10 here): the refiner runs every step, as A1111's
    apply_refiner (it was a GenerationError); its VAE decodes and the infotext names it."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    init = picture(SIZE, SIZE, seed=4)
    kw = dict(steps=10, sampler=sampler, schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    late = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, init_image=init, strength=0.2, **kw)
    r_alone = r_pipe(PROMPT, NEGATIVE, init_image=init, strength=0.2, progress=False, **kw)  # its own VAE encodes
    b_alone = b_pipe(PROMPT, NEGATIVE, init_image=init, strength=0.2, progress=False, **kw)
    assert _mad(late.arrays, r_alone.arrays) < _mad(late.arrays, b_alone.arrays) / 3
    assert "Refiner switch at: 0.7" in late.infotexts[0]


def test_hand_off_takes_the_noise_seed_delta(base):
    """A1111's ENSD (``noise_seed_delta``: the per-step noise from seed + delta) was ignored by the hand-off. With
    the base model as its own refiner, Euler a's hand-off is the plain run (the same draws in the same order), so
    it must equal the plain run with the same delta, and the infotext says ENSD."""
    _, b_pipe, _ = base
    kw = dict(steps=6, sampler="euler_a", schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    kw.update(progress=False, noise_seed_delta=31337)
    plain = b_pipe(PROMPT, NEGATIVE, **kw)
    res = b_pipe.generate_with_refiner(b_pipe, PROMPT, NEGATIVE, switch_at=0.5, **kw)
    assert _mad(res.arrays, plain.arrays) < 1e-6
    assert _mad(plain.arrays, b_pipe(PROMPT, NEGATIVE, **{**kw, "noise_seed_delta": 0}).arrays) > 3 * TOL
    assert "ENSD: 31337" in res.infotexts[0]


def test_hand_off_takes_the_noise_source(base):
    """noise_source "nv" (NVIDIA's numbers, A1111's NV / GPU source) in the hand-off: with the base model as its own
    refiner, Euler a's hand-off equals the plain nv run (the same Philox draws in the same order), which is another
    image than the CPU generator's; the infotext says RNG: NV."""
    _, b_pipe, _ = base
    kw = dict(steps=4, sampler="euler_a", schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    kw.update(progress=False, noise_source="nv")
    plain = b_pipe(PROMPT, NEGATIVE, **kw)
    res = b_pipe.generate_with_refiner(b_pipe, PROMPT, NEGATIVE, switch_at=0.5, **kw)
    assert _mad(res.arrays, plain.arrays) < 1e-6
    assert _mad(plain.arrays, b_pipe(PROMPT, NEGATIVE, **{**kw, "noise_source": "cpu"}).arrays) > 3 * TOL
    assert "RNG: NV" in res.infotexts[0] and "RNG: NV" in plain.infotexts[0]


def test_hand_off_reads_a1111s_brownian_tree(base):
    """Under A1111's rules DPM++ SDE draws its step noise from the image's Brownian tree over the whole grid; the
    hand-off drew the rows' generators instead. With the base model as its own refiner, a single-step sampler's
    hand-off is the plain run, so it must equal the plain A1111 run."""
    _, b_pipe, _ = base
    kw = dict(steps=6, sampler="dpmpp_sde", schedule="karras", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    kw.update(progress=False, strength_rule="a1111")
    plain = b_pipe(PROMPT, NEGATIVE, **kw)
    res = b_pipe.generate_with_refiner(b_pipe, PROMPT, NEGATIVE, switch_at=0.5, switch_rule="a1111", **kw)
    assert _mad(res.arrays, plain.arrays) < 1e-6
    assert "Strength rule: a1111" in res.infotexts[0]  # so that the infotext's run draws the trees too
    native = b_pipe(PROMPT, NEGATIVE, **{**kw, "strength_rule": "diffusers"})
    assert _mad(plain.arrays, native.arrays) > 3 * TOL  # the trees' noise, not the rows' generators'


def test_img2img_hand_off_with_the_tiny_encoder_says_so(base, refiner):
    """An img2img hand-off whose init latent is the tiny VAE encoder's (``vae_encode="tiny"``) wrote no "Tiny VAE
    encode": the infotext's re-run encoded with the full VAE, another image."""
    from sdengine.metadata import parse_parameters, to_generate_kwargs
    from sdengine.models.tiny_vae import TinyAutoencoder, TinyVAEConfig

    folder, _, _ = base
    _, r_pipe, _ = refiner
    pipe = sdengine.load_pipeline(folder, device="cpu")
    torch.manual_seed(8)
    config = TinyVAEConfig(
        decoder_channels=(8, 8), decoder_blocks=(1, 1), encoder_channels=(8, 8), encoder_blocks=(1, 1)
    )
    tiny = TinyAutoencoder(config)
    tiny.name = "tiny-enc"
    pipe.set_tiny_vae(tiny)
    kw = dict(steps=6, sampler="euler", schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    kw.update(init_image=picture(SIZE, SIZE, seed=4), strength=0.6, switch_at=0.7, progress=False)
    res = pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, vae_encode="tiny", **kw)
    full = pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, **kw)
    assert _mad(res.arrays, full.arrays) > 1e-3
    assert "Tiny VAE encode: tiny-enc" in res.infotexts[0] and "Tiny VAE" not in full.infotexts[0]
    assert to_generate_kwargs(parse_parameters(res.infotexts[0]))["vae_encode"] == "tiny"


def test_hand_off_reports_every_step_and_can_be_cancelled(base, refiner):
    """The request's step callback sees the base's steps and then the refiner's, counted over the whole run,
    and returning False cancels, as in a plain call; the hand-off once never called it."""
    from sdengine.pipeline.result import Cancelled

    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    seen = []
    kw = dict(switch_at=0.6, steps=5, sampler="euler", schedule="normal", seed=SEED, width=SIZE, height=SIZE)
    plain = b_pipe.generate_with_refiner(r_pipe, PROMPT, progress=False, **kw)
    res = b_pipe.generate_with_refiner(r_pipe, PROMPT, callback=lambda i: seen.append((i.step, i.steps)), **kw)
    assert seen == [(s, 5) for s in range(1, 6)]
    assert _mad(res.arrays, plain.arrays) == 0.0
    for stop in (2, 4):  # in the base's steps and in the refiner's
        with pytest.raises(Cancelled, match=f"after step {stop} of 5"):
            b_pipe.generate_with_refiner(r_pipe, PROMPT, callback=lambda i, stop=stop: i.step < stop, **kw)


def test_hand_off_notes_describe_the_job_as_a_whole(base, refiner):
    """A hand-off's aesthetic scores are the refiner's and its prompt_2 / target size the base's: no note says
    them unused (the base once noted "aesthetic_score: not used by a base model", the refiner "prompt_2: not
    used"). A setting neither model uses (a base as the refiner: the scores) is still said, once."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(switch_at=0.6, steps=3, sampler="euler", schedule="normal", seed=SEED, width=SIZE, height=SIZE)
    sdxl = {"aesthetic_score": 8.0, "prompt_2": "oil painting", "target_size": [64, 64]}
    res = b_pipe.generate_with_refiner(r_pipe, PROMPT, progress=False, sdxl=sdxl, **kw)
    assert not any("not used" in n for n in res.notes), res.notes
    res = b_pipe.generate_with_refiner(b_pipe, PROMPT, progress=False, sdxl=sdxl, batch_size=2, **kw)
    unused = [n for n in res.notes if "not used" in n]
    assert len(unused) == 1 and "sdxl aesthetic_score: not used by" in unused[0], res.notes


def test_a1111_switch_rule_takes_the_nearest_training_timestep(base):
    """A1111's refiner_switch_at: the refiner runs from the first step whose sigma's nearest training timestep t
    has (999 - t) / 1000 >= switch_at (apply_refiner); diffusers' denoising_end compares the (here fractional)
    timestep with (1 - switch_at) * 1000, so a step at t 299.9 is the refiner's there and the base's in A1111."""
    from sdengine.diffusion.schedules import SamplingGrid
    from sdengine.pipeline.sdxl import switch_step

    _, pipe, _ = base
    table = pipe.noise_schedule.sigmas
    ts = [999.0, 700.0, 299.9, 150.0]
    sig = [float(table[999]), float(table[700]), float(0.9 * table[300] + 0.1 * table[299]), float(table[150])]
    grid = SamplingGrid(sigmas=torch.tensor([*sig, 0.0]), timesteps=torch.tensor(ts))
    assert switch_step(grid, pipe.noise_schedule, 0.7, "diffusers") == 2
    assert switch_step(grid, pipe.noise_schedule, 0.7, "a1111") == 3
    assert switch_step(grid, pipe.noise_schedule, 0.84, "a1111") == 3  # t 150: (999 - 150) / 1000 = 0.849
    # no step reaches the switch: the base runs alone; a switch at or before the first step: the refiner does
    assert switch_step(grid, pipe.noise_schedule, 0.85, "a1111") == 4
    assert switch_step(grid, pipe.noise_schedule, 0.2, "a1111", first=2) == 2
    with pytest.raises(GenerationError, match="switch_rule must be one of"):
        pipe.generate_with_refiner(pipe, PROMPT, switch_rule="comfy")


@pytest.fixture(scope="module")
def a1111_sdxl(models_dir):
    """A live server on the base and refiner folders, and a txt2img call on tiny-sdxl (5 Euler steps)."""
    import base64
    import io

    import httpx
    from PIL import Image

    from _live_server import live_server, server_config

    body = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=5, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    body.update(sampler_name="Euler", scheduler="Normal", override_settings={"sd_model_checkpoint": "tiny-sdxl"})
    tmp = models_dir.parent / "a1111_refiner"
    with live_server(server_config(tmp, models_dir=models_dir)) as s, httpx.Client(base_url=s.url, timeout=120) as c:

        def txt2img(route="txt2img", **extra):
            """(response, first image as float64 RGB, info) of a txt2img (or ``route``) call with ``body`` and
            ``extra``."""
            r = c.post(f"/sdapi/v1/{route}", json={**body, **extra})
            if r.status_code != 200:
                return r, None, None
            got = r.json()
            image = Image.open(io.BytesIO(base64.b64decode(got["images"][0]))).convert("RGB")
            return r, np.asarray(image, np.float64), json.loads(got["info"])

        yield txt2img


def _hand_off_want(base, refiner):
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(steps=5, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw["progress"] = False
    want = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, switch_rule="a1111", **kw)
    return np.asarray(want.images[0], np.float64), np.asarray(b_pipe(PROMPT, NEGATIVE, **kw).images[0], np.float64)


def test_a1111_txt2img_runs_the_sdxl_refiner_at_refiner_switch_at(base, refiner, a1111_sdxl):
    """A1111's refiner_checkpoint / refiner_switch_at on /sdapi/v1/txt2img: the job loads the refiner and hands
    off at A1111's step; the image is generate_with_refiner's with switch_rule "a1111" (it was listed as ignored
    and the base model ran every step). Settings the hand-off cannot run are a 400, not a failed job."""
    want, alone = _hand_off_want(base, refiner)
    r, image, info = a1111_sdxl(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7)
    assert r.status_code == 200, r.text
    assert "refiner_checkpoint" not in info["ignored"]
    assert np.abs(image - want).max() == 0.0
    assert np.abs(image - alone).mean() > 1.0
    assert "Refiner: tiny-sdxl-refiner" in info["infotexts"][0] and "Refiner switch at: 0.7" in info["infotexts"][0]
    for extra, says in (
        (dict(refiner_checkpoint="nope", refiner_switch_at=0.7), "unknown model 'nope'"),
        (dict(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at="0.5"), "refiner_switch_at must be a number"),
        (dict(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7, sampler_name="DDIM"), "DDIM"),
        (
            dict(
                refiner_checkpoint="tiny-sdxl-refiner",
                refiner_switch_at=0.7,
                enable_hr=True,
                override_settings={"sd_model_checkpoint": "tiny-sdxl", "hires_fix_refiner_pass": "third pass"},
            ),
            "hires_fix_refiner_pass must be one of",
        ),
    ):
        r, _, _ = a1111_sdxl(**extra)
        assert r.status_code == 400 and says.lower() in r.text.lower(), (extra, r.text)


def test_a1111_refiner_without_refiner_switch_at_runs_the_refiner_from_the_first_step(base, refiner, a1111_sdxl):
    """A1111's refiner_switch_at defaults to None (StableDiffusionProcessing), where its apply_refiner switches
    before the first step: the refiner runs every step. A refiner_checkpoint without it was a 400. Now it is the
    hand-off at 0; an A1111 infotext with "Refiner" and no "Refiner switch at" (A1111 leaves None out) too."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(steps=5, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    want = b_pipe.generate_with_refiner(
        r_pipe, PROMPT, NEGATIVE, switch_at=0.0, switch_rule="a1111", progress=False, **kw
    )
    r, image, info = a1111_sdxl(refiner_checkpoint="tiny-sdxl-refiner")
    assert r.status_code == 200, r.text
    assert np.abs(image - np.asarray(want.images[0], np.float64)).max() == 0.0
    assert "Refiner: tiny-sdxl-refiner" in info["infotexts"][0] and info["ignored"] == []
    text = info["infotexts"][0].replace(", Refiner switch at: 0", "").replace(", Refiner switch rule: a1111", "")
    text = text.split(", Version:")[0] + ", Version: v1.10.1"
    assert "Refiner switch" not in text and "RNG" not in text
    r, again, _ = a1111_sdxl(infotext=text + ", RNG: CPU", prompt=None, negative_prompt=None, seed=None, steps=None)
    assert r.status_code == 200, r.text
    assert np.abs(again - image).max() == 0.0


def _a1111_hires_kw(steps=5):
    kw = dict(steps=steps, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw.update(progress=False, enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", strength=0.6, strength_rule="a1111")
    return kw, dict(enable_hr=True, hr_scale=2.0, denoising_strength=0.6, steps=steps)


def test_a1111_hires_fix_runs_the_refiner_and_hr_checkpoint_name(base, refiner, a1111_sdxl):
    """A1111's hires fix with refiner_checkpoint (a 400 before): the refiner hands off in the second pass (A1111's
    hires_fix_refiner_pass default), as generate_with_refiner with A1111's step rules, and the image is not the
    no-refiner one; hr_checkpoint_name naming another model (a 422 before) runs the second pass on it (``hr_model``)."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw, hires = _a1111_hires_kw(steps=3)  # the second pass's 5-step schedule hands off at its step 4
    alone = np.asarray(b_pipe(PROMPT, NEGATIVE, **kw).images[0], np.float64)
    r, image, info = a1111_sdxl(**hires, refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7)
    assert r.status_code == 200, r.text
    want = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, switch_rule="a1111", **kw)
    assert image.shape == (2 * SIZE, 2 * SIZE, 3)
    assert np.abs(image - np.asarray(want.images[0], np.float64)).max() == 0.0
    assert np.abs(image - alone).mean() > 1.0
    assert "Refiner: tiny-sdxl-refiner" in info["infotexts"][0] and "refiner_checkpoint" not in info["ignored"]
    r, image, info = a1111_sdxl(**hires, hr_checkpoint_name="tiny-sdxl-refiner")
    assert r.status_code == 200, r.text
    want = b_pipe(PROMPT, NEGATIVE, hr_model=r_pipe, **kw)
    assert np.abs(image - np.asarray(want.images[0], np.float64)).max() == 0.0
    assert np.abs(image - alone).mean() > 1.0
    assert "Hires checkpoint: tiny-sdxl-refiner" in info["infotexts"][0] and "hr_checkpoint_name" not in info["ignored"]


@pytest.mark.slow
def test_a1111_hires_fix_refiner_pass_option(base, refiner, a1111_sdxl):
    """A1111's hires_fix_refiner_pass reaches the job: "first pass" hands off in the first pass (its infotext says
    so); an unknown hr_checkpoint_name is a 400 naming the models."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw, hires = _a1111_hires_kw()
    over = {"sd_model_checkpoint": "tiny-sdxl", "hires_fix_refiner_pass": "first pass"}
    hand = dict(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7)
    r, image, info = a1111_sdxl(**hires, **hand, override_settings=over)
    assert r.status_code == 200, r.text
    want = b_pipe.generate_with_refiner(
        r_pipe, PROMPT, NEGATIVE, switch_at=0.7, switch_rule="a1111", hires_pass="first pass", **kw
    )
    assert np.abs(image - np.asarray(want.images[0], np.float64)).max() == 0.0
    assert "Hires refiner: first pass" in info["infotexts"][0]
    r, again, _ = a1111_sdxl(infotext=info["infotexts"][0], prompt=None, steps=None, seed=None, enable_hr=None)
    assert r.status_code == 200, r.text
    assert np.abs(again - image).max() == 0.0  # its "Hires refiner" sets the option again
    r, _, _ = a1111_sdxl(**hires, hr_checkpoint_name="nope")
    assert r.status_code == 400 and "unknown model 'nope'" in r.text.lower(), r.text


def test_a1111_img2img_runs_the_sdxl_refiner(base, refiner, a1111_sdxl):
    """A1111 runs refiner_checkpoint in img2img too, switching on the img2img's schedule; it was listed as
    ignored (the base ran every step). The image is generate_with_refiner's from the init image (A1111's strength
    rule and switch step); its infotext runs it again; with a mask it runs as an inpainting hand-off."""
    import base64
    import io

    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    init = picture(SIZE, SIZE, seed=4)
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    kw = dict(steps=10, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw.update(progress=False, init_image=init, strength=0.6, strength_rule="a1111")
    want = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, switch_rule="a1111", **kw)
    alone = b_pipe(PROMPT, NEGATIVE, **kw).arrays[0] * 255
    i2i = dict(route="img2img", init_images=[b64], denoising_strength=0.6, steps=10)
    r, image, info = a1111_sdxl(**i2i, refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7)
    assert r.status_code == 200, r.text
    assert "refiner_checkpoint" not in info["ignored"], info["ignored"]
    assert np.abs(image - np.asarray(want.images[0], np.float64)).max() == 0.0
    assert np.abs(image - alone).mean() > 1.0
    text = info["infotexts"][0]
    assert "Refiner: tiny-sdxl-refiner" in text and "Denoising strength: 0.6" in text
    r, again, _ = a1111_sdxl(route="img2img", init_images=[b64], infotext=text, prompt=None, steps=None, seed=None)
    assert r.status_code == 200, r.text
    assert np.abs(again - image).max() == 0.0
    from PIL import Image

    # inpainting: A1111 runs the refiner with the mask (its blend goes on over the refiner's steps); the image
    # is the hand-off's, not the base's alone, and the region the mask keeps is the init image (the overlay)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    m64 = base64.b64encode(buf.getvalue()).decode()
    hand = dict(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7)
    r, inpainted, info = a1111_sdxl(**i2i, mask=m64, mask_blur=0, **hand)
    assert r.status_code == 200, r.text
    assert "Refiner: tiny-sdxl-refiner" in info["infotexts"][0]
    r, base_only, _ = a1111_sdxl(**i2i, mask=m64, mask_blur=0)
    assert np.abs(inpainted - base_only)[:, : SIZE // 2].mean() > 1.0
    kept = np.asarray(init.convert("RGB"), np.float64)[:, SIZE // 2 + 8 :]
    assert np.abs(inpainted[:, SIZE // 2 + 8 :] - kept).max() <= 1.0


@pytest.mark.slow
def test_a1111_refiner_infotext_round_trip_and_no_refiner_cases(base, refiner, a1111_sdxl):
    """An A1111 infotext's "Refiner" and "Refiner switch at" (its refiner script's paste fields) run the hand-off
    again; an unknown refiner there is a 400. A1111 runs no refiner at a switch of 1 (no step reaches it) nor the
    loaded model as its own refiner."""
    want, alone = _hand_off_want(base, refiner)
    _, image, info = a1111_sdxl(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7)
    text = info["infotexts"][0]
    r, again, _ = a1111_sdxl(infotext=text, prompt=None, negative_prompt=None, seed=None, steps=None)
    assert r.status_code == 200, r.text
    assert np.abs(again - want).max() == 0.0
    r, _, _ = a1111_sdxl(infotext=text.replace("Refiner: tiny-sdxl-refiner", "Refiner: elsewhere"))
    assert r.status_code == 400 and "Refiner: unknown model 'elsewhere'" in r.text, r.text
    for extra in (dict(refiner_switch_at=1.0), dict(refiner_checkpoint="tiny-sdxl", refiner_switch_at=0.7)):
        r, image, info = a1111_sdxl(**{"refiner_checkpoint": "tiny-sdxl-refiner", **extra})
        assert r.status_code == 200, r.text
        assert "Refiner" not in info["infotexts"][0] and np.abs(image - alone).max() == 0.0


def test_a1111_infotext_of_a_native_sdxl_image_keeps_its_own_clip_skip(base, a1111_sdxl):
    """An sdengine SDXL image's infotext ("Clip skip: 2", no "Clip skip rule": sdengine's own layer) sent as
    A1111's ``infotext``: its Clip skip became A1111's CLIP_stop_at_last_layers, which SDXL ignores, so another
    image came back. Now it runs with sdengine's meaning; an A1111 infotext's Clip skip stays A1111's."""
    _, b_pipe, _ = base
    kw = dict(steps=5, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    native = b_pipe(PROMPT, NEGATIVE, clip_skip=2, progress=False, **kw)
    text = native.infotexts[0]
    assert "Clip skip: 2" in text and "Clip skip rule" not in text and "Version: sdengine" in text
    r, image, info = a1111_sdxl(infotext=text, prompt=None, negative_prompt=None, seed=None, steps=None)
    assert r.status_code == 200, r.text
    assert np.abs(image - np.asarray(native.images[0], np.float64)).max() == 0.0
    assert info["infotexts"][0] == text
    plain = np.asarray(b_pipe(PROMPT, NEGATIVE, progress=False, **kw).images[0], np.float64)
    assert np.abs(image - plain).mean() > 0.5  # the clip skip did change it
    a1111_text = text.split(", Version:")[0] + ", RNG: CPU, Version: v1.10.1"  # A1111's Clip skip: ignored on SDXL
    r, image, info = a1111_sdxl(infotext=a1111_text, prompt=None, negative_prompt=None, seed=None, steps=None)
    assert r.status_code == 200, r.text
    assert np.abs(image - plain).max() == 0.0 and "Clip skip rule: a1111" in info["infotexts"][0]


def test_server_takes_sdxl_settings_natively_and_as_a1111_options(base, refiner, a1111_sdxl, models_dir):
    """The native /v1/jobs had no way to send SDXL's settings (prompt_2, micro-conditioning, aesthetic scores:
    refused as an unknown field), and A1111's SDXL options (sdxl_crop_top / _left, the refiner's
    sdxl_refiner_high / low_aesthetic_score) were listed as ignored: the crop or score A1111 would use was not."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(steps=3, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw["progress"] = False
    # A1111: the crop reaches the base model (both prompts), the scores the refiner
    want = b_pipe(PROMPT, NEGATIVE, sdxl={"crops_coords_top_left": [8, 4]}, **kw).arrays[0] * 255
    crop = {"sdxl_crop_top": 8, "sdxl_crop_left": 4}
    body = dict(steps=3, override_settings={"sd_model_checkpoint": "tiny-sdxl", **crop})
    r, image, info = a1111_sdxl(**body)
    assert r.status_code == 200 and not info["ignored"], r.text
    assert np.abs(image - want).max() <= 1.0  # 8-bit rounding of the same pixels
    assert np.abs(image - b_pipe(PROMPT, NEGATIVE, **kw).arrays[0] * 255).mean() > 0.5  # the crop did change it
    scores = {"sdxl_refiner_high_aesthetic_score": 8.0, "sdxl_refiner_low_aesthetic_score": 1.0}
    want = r_pipe(PROMPT, NEGATIVE, sdxl={"aesthetic_score": 8.0, "negative_aesthetic_score": 1.0}, **kw)
    r, image, info = a1111_sdxl(steps=3, override_settings={"sd_model_checkpoint": "tiny-sdxl-refiner", **scores})
    assert r.status_code == 200 and not info["ignored"], r.text
    assert np.abs(image - want.arrays[0] * 255).max() <= 1.0
    r, _, _ = a1111_sdxl(override_settings={"sdxl_crop_top": -1})
    assert r.status_code == 400 and "sdxl_crop_top must be an integer" in r.text
    # as A1111, the options are unused by other models (an SD 1.x job does not fail on "sdxl settings")
    emoji = dict(steps=2, width=64, height=64)
    r, plain, _ = a1111_sdxl(**emoji, override_settings={"sd_model_checkpoint": "emoji"})
    r, image, info = a1111_sdxl(**emoji, override_settings={"sd_model_checkpoint": "emoji", **crop, **scores})
    assert r.status_code == 200 and not info["notes"], r.text
    assert np.abs(image - plain).max() == 0.0


def test_force_zeros_setting_zeroes_an_empty_negative_on_the_refiner(refiner, base):
    """The sdxl setting ``force_zeros_for_empty_prompt`` replaces the folder's rule (the refiner's folder says
    false): true zeroes the refiner's empty negative (text states and pooled part of the vector), as A1111 does."""
    _, r_pipe, _ = refiner
    _, b_pipe, _ = base
    cond = r_pipe.conditioner
    _, own = cond.pair(PROMPT, "", width=SIZE, height=SIZE)
    _, zeroed = cond.pair(PROMPT, "", width=SIZE, height=SIZE, options={"force_zeros_for_empty_prompt": True})
    pooled = r_pipe.text_encoder_2.config.projection_dim
    assert own["crossattn"].abs().max() > 0 and own["vector"][:, :pooled].abs().max() > 0  # the folder's rule
    assert zeroed["crossattn"].abs().max() == 0 and zeroed["vector"][:, :pooled].abs().max() == 0
    assert torch.equal(zeroed["vector"][:, pooled:], own["vector"][:, pooled:])  # the size/score numbers kept
    _, kept = b_pipe.conditioner.pair(PROMPT, "", options={"force_zeros_for_empty_prompt": False})
    assert kept["crossattn"].abs().max() > 0  # false: the base encodes the empty prompt
    with pytest.raises(GenerationError, match="force_zeros_for_empty_prompt must be true or false"):
        cond.pair(PROMPT, "", options={"force_zeros_for_empty_prompt": 1})


def test_a1111_zeroes_an_empty_negative_on_the_refiner_too(base, refiner, a1111_sdxl):
    """A1111 zeroes an empty negative prompt (its default) on every SDXL model (force_zero_negative_prompt in
    sd_models_xl.py), the refiner too; the A1111 route followed the refiner folder's model_index.json (false),
    both in the hand-off and for a refiner as the job's model. The rule is recorded in the infotext, and the
    native route keeps the folder's rule."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(steps=3, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw["progress"] = False
    zero = {"force_zeros_for_empty_prompt": True}
    want = r_pipe(PROMPT, "", sdxl=zero, **kw).arrays[0] * 255
    folder_rule = r_pipe(PROMPT, "", **kw).arrays[0] * 255
    as_model = {"sd_model_checkpoint": "tiny-sdxl-refiner"}
    r, image, info = a1111_sdxl(steps=3, negative_prompt="", override_settings=as_model)
    assert r.status_code == 200, r.text
    assert np.abs(image - want).max() <= 1.0 and np.abs(image - folder_rule).mean() > 0.5
    assert '{"force_zeros_for_empty_prompt": true}' in info["infotexts"][0].replace('\\"', '"')
    kw["steps"] = 5
    hand = b_pipe.generate_with_refiner(r_pipe, PROMPT, "", switch_at=0.7, switch_rule="a1111", sdxl=zero, **kw)
    r, image, info = a1111_sdxl(negative_prompt="", refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7)
    assert r.status_code == 200, r.text
    assert np.abs(image - np.asarray(hand.images[0], np.float64)).max() == 0.0
    # a base model zeroes already, and a negative prompt is not empty: nothing recorded
    r, _, info = a1111_sdxl(steps=2, negative_prompt="")
    assert "SDXL options" not in info["infotexts"][0]
    r, _, info = a1111_sdxl(steps=2, override_settings=as_model)
    assert "SDXL options" not in info["infotexts"][0]


def test_a1111_sdxl_options_round_trip_through_the_infotext_field(base, refiner, a1111_sdxl):
    """A1111's crop (sdxl_crop_top / _left) and the refiner's scores, set as options, are written in the infotext
    ("SDXL options"); the A1111 route's ``infotext`` field did not read them back (the re-run lost the crop).
    The refiner's negative prompt takes A1111's crop too (sdengine's refiner default was (0, 0)), and the
    settings A1111 has no option for (prompt_2, sizes: a native image) are run again as well."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(steps=3, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw["progress"] = False
    crop = {"sdxl_crop_top": 8, "sdxl_crop_left": 4}
    scores = {"sdxl_refiner_high_aesthetic_score": 8.0, "sdxl_refiner_low_aesthetic_score": 1.0}
    both = {"crops_coords_top_left": [8, 4], "negative_crops_coords_top_left": [8, 4]}
    want = r_pipe(PROMPT, NEGATIVE, sdxl={**both, "aesthetic_score": 8.0, "negative_aesthetic_score": 1.0}, **kw)
    r, image, info = a1111_sdxl(
        steps=3, override_settings={"sd_model_checkpoint": "tiny-sdxl-refiner", **crop, **scores}
    )
    assert r.status_code == 200, r.text
    assert np.abs(image - want.arrays[0] * 255).max() <= 1.0
    again = dict(infotext=info["infotexts"][0], prompt=None, negative_prompt=None, seed=None, steps=None)
    r, image2, info2 = a1111_sdxl(**again, override_settings={"sd_model_checkpoint": "tiny-sdxl-refiner"})
    assert r.status_code == 200, r.text
    assert np.abs(image2 - image).max() == 0.0 and info2["infotexts"][0] == info["infotexts"][0]
    # an image of the native route: prompt_2 and a size A1111 has no option for, a crop without a negative one
    settings = {"prompt_2": "a green pear", "target_size": [64, 64], "crops_coords_top_left": [4, 8]}
    native = b_pipe(PROMPT, NEGATIVE, sdxl=settings, **kw)
    r, image, info = a1111_sdxl(infotext=native.infotexts[0], prompt=None, negative_prompt=None, seed=None, steps=None)
    assert r.status_code == 200, r.text
    assert np.abs(image - native.arrays[0] * 255).max() <= 1.0
    r, _, _ = a1111_sdxl(infotext=native.infotexts[0].replace("target_size", "target_sighs"))
    assert r.status_code == 400 and "infotext: SDXL options: unknown sdxl settings: target_sighs" in r.text, r.text


def test_a1111_zero_rule_reaches_a_job_only_where_it_changes_something():
    """The worker's sdxl settings of a job (alone or batched): A1111's empty-negative rule goes to a model whose
    folder would not zero (a refiner) when an empty negative prompt is there, and A1111 jobs still batch."""
    from types import SimpleNamespace as NS

    from sdengine.server.jobs import batch_key, sdxl_request

    def pipe(zeros, refiner):
        return NS(text_kind="sdxl", refiner=refiner, conditioner=NS(force_zeros=zeros))

    base, ref, sd1 = pipe(True, False), pipe(False, True), NS(text_kind="sd1")
    g = NS(kwargs={}, sdxl_options={"force_zeros_for_empty_prompt": True})
    assert sdxl_request(g, ref, None, [""]) == {"force_zeros_for_empty_prompt": True}
    assert sdxl_request(g, ref, None, [["a", ""]]) == {"force_zeros_for_empty_prompt": True}  # a batch's rows
    assert sdxl_request(g, base, ref, [None]) == {"force_zeros_for_empty_prompt": True}  # the hand-off's refiner
    assert sdxl_request(g, base, None, [""]) is None  # the base zeroes already: nothing to record
    assert sdxl_request(g, ref, None, ["blurry"]) is None and sdxl_request(g, sd1, None, [""]) is None
    job = NS(run_on=None, generation=NS(refiner=None, n_iter=1, model="m", sdxl_options=g.sdxl_options, kwargs={}))
    assert batch_key(job) is not None
    job.generation.sdxl_options = {"force_zeros_for_empty_prompt": True, "aesthetic_score": 8.0}
    assert batch_key(job) is None


def test_native_jobs_take_sdxl_settings(base, models_dir):
    """/v1/jobs refused ``sdxl`` (an unknown field): SDXL's second prompts and micro-conditioning could not be
    sent. Now the request's settings, as the Python API's; bad ones are a 400."""
    import io

    import httpx
    from PIL import Image

    from _live_server import live_server, server_config, wait_job

    _, b_pipe, _ = base
    kw = dict(steps=3, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    settings = {"prompt_2": "a green pear", "original_size": [64, 64], "target_size": [32, 32]}
    want = b_pipe(PROMPT, NEGATIVE, sdxl=settings, progress=False, **kw).images[0]
    job = dict(model="tiny-sdxl", prompt=PROMPT, negative_prompt=NEGATIVE, **kw)
    tmp = models_dir.parent / "native_sdxl"
    with live_server(server_config(tmp, models_dir=models_dir)) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        r = c.post("/v1/jobs", json={**job, "sdxl": settings})
        assert r.status_code == 202, r.text
        done = wait_job(c, r.json()["id"])
        assert done["state"] == "done", done
        got = Image.open(io.BytesIO(c.get(done["images"][0]["url"]).content)).convert("RGB")
        assert np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() == 0.0
        assert '"prompt_2": "a green pear"' in done["infotexts"][0].replace('\\"', '"')
        r = c.post("/v1/jobs", json={**job, "sdxl": {"crops": [1, 2]}})
        assert r.status_code == 400 and "unknown sdxl settings: crops" in r.text, r.text


def test_latent_hires_fix_matches_diffusers_txt2img_then_img2img(base):
    """The hires fix on SDXL (Latent upscaler): diffusers' base to latents, bilinear x2, its img2img pipeline on
    them (whose micro-conditioning is the upscaled size, as A1111's second-pass conditioning is)."""
    import diffusers
    import torch.nn.functional as F

    folder, pipe, ref = base
    hr = dict(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", strength=0.6)
    ours = _ours(pipe, "euler", **hr).arrays
    ref.scheduler = diffusers_scheduler(folder, "euler")
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0)
    gen = torch.Generator("cpu").manual_seed(SEED)
    lat = ref(PROMPT, width=SIZE, height=SIZE, generator=gen, output_type="latent", **common).images
    i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    i2i.scheduler = diffusers_scheduler(folder, "euler")
    up = F.interpolate(lat.float(), size=(SIZE, SIZE), mode="bilinear")  # 2x the SIZE // 2 latent
    gen = torch.Generator("cpu").manual_seed(SEED)
    theirs = i2i(PROMPT, image=up, strength=0.6, generator=gen, output_type="np", **common).images
    assert ours.shape == (1, 2 * SIZE, 2 * SIZE, 3)
    assert _mad(ours, theirs) < 1e-5


def test_hand_off_bad_settings(base, refiner):
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    with pytest.raises(GenerationError, match="switch_at must be a number in"):
        b_pipe.generate_with_refiner(r_pipe, PROMPT, switch_at=1.5)
    with pytest.raises(GenerationError, match="hand-off takes no ControlNet or LoRA"):
        b_pipe.generate_with_refiner(r_pipe, PROMPT, loras=[("x.safetensors", 1.0)], width=SIZE, height=SIZE)
    hr = dict(enable_hr=True, hr_scale=2.0, width=SIZE, height=SIZE)
    with pytest.raises(GenerationError, match="hires_fix_refiner_pass must be one of 'first pass'"):
        b_pipe.generate_with_refiner(r_pipe, PROMPT, hires_pass="third pass", **hr)
    # the second pass's own sampler hands off too (it failed inside the sampler); the first pass's runs alone there
    with pytest.raises(GenerationError, match="hr_sampler ddim is not supported with a refiner hand-off"):
        b_pipe.generate_with_refiner(r_pipe, PROMPT, hr_sampler="ddim", steps=4, **hr)
    with pytest.raises(GenerationError, match="^sampler ddim is not supported"):
        b_pipe.generate_with_refiner(r_pipe, PROMPT, sampler="ddim", hr_sampler="euler", hires_pass="first pass", **hr)
    with pytest.raises(GenerationError, match="hr_model is the hires fix's second-pass model: it needs enable_hr"):
        b_pipe.generate_with_refiner(r_pipe, PROMPT, hr_model=r_pipe, width=SIZE, height=SIZE)
    with pytest.raises(GenerationError, match="hr_model must be a pipeline"):
        b_pipe(PROMPT, hr_model="tiny-sdxl-refiner", **hr)
    # a sampler on diffusers' timestep grid cannot stop at the switch: said before any model runs (it once failed
    # inside the sampler with "end_step must be in (0, N] and the sampler a sigma-grid one")
    for sampler in ("ddim", "plms", "lcm", "ddpm"):
        with pytest.raises(GenerationError, match=f"sampler {sampler} is not supported with a refiner hand-off"):
            b_pipe.generate_with_refiner(r_pipe, PROMPT, sampler=sampler, steps=4, width=SIZE, height=SIZE)


def _hires_pieces(base, refiner):
    """The pieces a hires fix with the refiner is made of, each a plain call: the first pass with and without the
    hand-off, the Lanczos x2 upscale, and the second pass (an img2img at the larger size, the hires module's rule
    for a pixel upscaler) with and without the hand-off; diffusers' step rule, 5 Euler steps, strength 0.6."""
    from PIL import Image

    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(steps=STEPS, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw["progress"] = False
    big = dict(kw, width=2 * SIZE, height=2 * SIZE, strength=0.6)

    def up(image):
        return image.resize((2 * SIZE, 2 * SIZE), Image.Resampling.LANCZOS)

    def hand(init=None, **extra):
        return b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, **extra)

    return b_pipe, r_pipe, kw, big, up, hand


@pytest.mark.slow
def test_hires_fix_hands_off_to_the_refiner_on_the_pass_a1111_names(base, refiner):
    """The hires fix with a refiner (it was refused): A1111's hires_fix_refiner_pass says which pass hands off.
    Each image equals the composition of plain calls: "second pass" (A1111's default) = the base's txt2img, x2,
    then an img2img hand-off; "first pass" = a txt2img hand-off (the refiner's VAE decodes it), x2, then the
    base's img2img (A1111 reloads the base for the second pass); "both passes" = both hand-offs. None is the
    no-refiner hires image, and the infotext says the pass where it is not A1111's default."""
    b_pipe, r_pipe, kw, big, up, hand = _hires_pieces(base, refiner)
    hr = dict(kw, enable_hr=True, hr_scale=2.0, hr_upscaler="Lanczos", strength=0.6)
    plain_first = b_pipe(PROMPT, NEGATIVE, **kw).images[0]
    hand_first = hand(**kw).images[0]
    want = {
        "second pass": hand(init_image=up(plain_first), **big),
        "first pass": b_pipe(PROMPT, NEGATIVE, init_image=up(hand_first), **big),
        "both passes": hand(init_image=up(hand_first), **big),
    }
    alone = b_pipe(PROMPT, NEGATIVE, **hr).arrays[0]
    for which, w in want.items():
        got = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, hires_pass=which, **hr)
        assert got.arrays.shape == (1, 2 * SIZE, 2 * SIZE, 3)
        assert np.abs(got.arrays[0] - w.arrays[0]).max() == 0.0, which
        assert np.abs(got.arrays[0] - alone).mean() > 1e-3, which
        assert ("Hires refiner: " + which in got.infotexts[0]) == (which != "second pass"), got.infotexts[0]
        assert "Hires upscaler: Lanczos" in got.infotexts[0] and "Refiner: tiny-sdxl-refiner" in got.infotexts[0]


@pytest.mark.slow
def test_hires_fix_second_pass_runs_on_hr_model(base, refiner):
    """A1111's hr_checkpoint_name as ``hr_model``: the second pass runs on that model (here the refiner as a plain
    model): the base's txt2img, x2, then hr_model's img2img; its infotext names it ("Hires checkpoint"). With a
    refiner, the second pass hands off from hr_model."""
    b_pipe, r_pipe, kw, big, up, hand = _hires_pieces(base, refiner)
    hr = dict(kw, enable_hr=True, hr_scale=2.0, hr_upscaler="Lanczos", strength=0.6)
    plain_first = b_pipe(PROMPT, NEGATIVE, **kw).images[0]
    want = r_pipe(PROMPT, NEGATIVE, init_image=up(plain_first), **big)
    got = b_pipe(PROMPT, NEGATIVE, hr_model=r_pipe, **hr)
    assert np.abs(got.arrays[0] - want.arrays[0]).max() == 0.0
    assert np.abs(got.arrays[0] - b_pipe(PROMPT, NEGATIVE, **hr).arrays[0]).mean() > 1e-3
    assert "Hires checkpoint: tiny-sdxl-refiner" in got.infotexts[0]
    # the refiner's hand-off in the second pass starts from hr_model (here the base: the same as without it)
    same = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, hr_model=b_pipe, **hr)
    assert np.abs(same.arrays[0] - hand(init_image=up(plain_first), **big).arrays[0]).max() == 0.0


def test_img2img_fix_steps_hand_off_runs_the_steps_asked(base, refiner):
    """A1111's img2img_fix_steps (strength_rule "a1111_fix_steps") with the refiner: img2img runs the steps asked,
    the last of a steps / strength schedule, as the base alone does (the hand-off ran A1111's plain count on a
    steps-long schedule: 3 of 4 steps at strength 0.5, another image)."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(steps=4, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw.update(progress=False, init_image=picture(SIZE, SIZE), strength=0.5)
    counts = {}
    for rule in ("a1111", "a1111_fix_steps"):
        seen = []
        b_pipe.generate_with_refiner(
            r_pipe, PROMPT, NEGATIVE, switch_at=0.8, switch_rule="a1111", strength_rule=rule, callback=seen.append, **kw
        )
        base_seen = []
        b_pipe(PROMPT, NEGATIVE, strength_rule=rule, callback=base_seen.append, **kw)
        counts[rule] = (len(seen), seen[-1].steps, len(base_seen))
    assert counts == {"a1111": (3, 3, 3), "a1111_fix_steps": (4, 4, 4)}, counts


def test_inpainting_hand_off_blends_on_the_refiners_steps_too(base, refiner):
    """An inpainting hand-off (A1111 runs the refiner with a mask; it was refused): the blend of the request's rule
    goes on over the refiner's steps, so every step's x0, the refiner's too, keeps the init latent where the mask
    keeps the image; the repainted region is the hand-off's (not the base's alone)."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255
    from PIL import Image

    kw = dict(steps=6, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    kw.update(progress=False, init_image=picture(SIZE, SIZE), mask=Image.fromarray(mask), strength=0.8)
    for rule, switch_at in (("a1111", 0.5), ("diffusers", 0.6)):
        seen = []
        res = b_pipe.generate_with_refiner(
            r_pipe,
            PROMPT,
            NEGATIVE,
            switch_at=switch_at,
            switch_rule=rule,
            strength_rule=rule,
            callback=seen.append,
            **kw,
        )
        keep = seen[0].denoised[..., SIZE // 4 + 1 :]
        assert len(seen) >= 3
        for info in seen:  # the latent is 2x smaller: columns past SIZE // 4 are kept
            if rule == "a1111":  # A1111's: each x0 blended with the clean init latent
                assert torch.equal(info.denoised[..., SIZE // 4 + 1 :], keep), info.step
        alone = b_pipe(PROMPT, NEGATIVE, strength_rule=rule, **kw).arrays[0]
        assert np.abs(res.arrays[0] - alone)[:, : SIZE // 2].mean() > 1e-3, rule
        assert seen[-1].step == seen[-1].steps  # the refiner's steps counted on from the base's
    # A1111's latent_mask (a quarter), mask_round off: both models' x0 kept by it, not by the mask (a half)
    lat = np.zeros((SIZE, SIZE), np.uint8)
    lat[:, : SIZE // 4] = 255
    seen = []
    b_pipe.generate_with_refiner(
        r_pipe, PROMPT, NEGATIVE, switch_at=0.5, switch_rule="a1111", strength_rule="a1111", callback=seen.append,
        latent_mask=Image.fromarray(lat), mask_round=False, **kw,
    )  # fmt: skip
    keep = seen[0].denoised[..., SIZE // 8 + 1 :]  # past the latent mask's bicubic edge (clipped to 0 there)
    assert len(seen) >= 3 and all(torch.equal(i.denoised[..., SIZE // 8 + 1 :], keep) for i in seen)


# ------------------------------------------------------------------------------------------ inpainting


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("dpmpp_2m", 0.6)])
def test_inpaint_blended_4_channel_matches_diffusers(base, base_ref, sampler, strength):
    """The base model with a mask: the known region is blended back after each step, as diffusers does."""
    folder, pipe, _ = base
    ref = base_ref(folder, inpaint=True)
    img, mask = picture(SIZE, SIZE), mask_picture(SIZE, SIZE)
    ours = _ours(pipe, sampler, init_image=img, mask=mask, strength=strength, steps=8).arrays
    theirs = _theirs(ref, folder, sampler, image=img, mask_image=mask, strength=strength, num_inference_steps=8)
    mad = _mad(ours, theirs)
    print(f"sdxl inpaint (4-channel, blended) {sampler} {strength}: mean abs {mad:.2e}")
    assert mad < TOL


@pytest.fixture(scope="module")
def inpaint9(tmp_path_factory):
    folder = make_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl-inpaint", inpaint=True, seed=9)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_sdxl(folder, inpaint=True)


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("dpmpp_2m", 0.6)])
def test_inpaint_9_channel_matches_diffusers(inpaint9, sampler, strength):
    folder, pipe, ref = inpaint9
    assert pipe.inpainting
    img, mask = picture(SIZE, SIZE), mask_picture(SIZE, SIZE)
    ours = _ours(pipe, sampler, init_image=img, mask=mask, strength=strength, steps=8).arrays
    theirs = _theirs(ref, folder, sampler, image=img, mask_image=mask, strength=strength, num_inference_steps=8)
    mad = _mad(ours, theirs)
    print(f"sdxl inpaint (9-channel) {sampler} {strength}: mean abs {mad:.2e}")
    assert mad < TOL


# ------------------------------------------------------------------------------------------ text details


def test_clip_skip_is_a1111_numbering_of_diffusers_clip_skip(base):
    """sdengine's clip_skip k (A1111: 1 = SDXL's own penultimate layer) is diffusers' clip_skip k - 1."""
    _, pipe, ref = base
    cond, _ = pipe.conditioner.pair(PROMPT, NEGATIVE, clip_skip=2, width=SIZE, height=SIZE)
    pe, _, pooled, _ = ref.encode_prompt(PROMPT, negative_prompt=NEGATIVE, device="cpu", clip_skip=1)
    assert (cond["crossattn"] - pe).abs().max() <= 1e-5
    assert (cond["vector"][:, :32] - pooled).abs().max() <= 1e-5  # the pooled output does not move
    default, _ = pipe.conditioner.pair(PROMPT, NEGATIVE, width=SIZE, height=SIZE)
    assert (default["crossattn"] - cond["crossattn"]).abs().max() > 1e-3
    with pytest.raises(GenerationError, match="clip_skip must be an integer in 0..2"):
        pipe.conditioner.pair(PROMPT, NEGATIVE, clip_skip=3)


def test_emphasis_and_long_prompts_use_both_encoders(base):
    _, pipe, _ = base
    plain, _ = pipe.conditioner.pair("a red apple", "", width=SIZE, height=SIZE)
    weighted, _ = pipe.conditioner.pair("a (red:1.5) apple", "", width=SIZE, height=SIZE)
    diff = (plain["crossattn"] - weighted["crossattn"]).abs().amax(dim=(0, 1))  # per feature
    assert diff[:32].max() > 1e-3 and diff[32:].max() > 1e-3  # CLIP-L's and bigG's halves both weighted
    long, uncond = pipe.conditioner.pair(" ".join(["apple"] * 100), "", width=SIZE, height=SIZE)
    assert long["crossattn"].shape == uncond["crossattn"].shape == (1, 154, 80)  # two chunks, padded alike
    assert float(uncond["crossattn"].abs().max()) == 0.0  # force_zeros_for_empty_prompt covers every chunk
    # a long prompt_2 next to a short prompt: the short side is padded with its empty prompt's chunk
    two, _ = pipe.conditioner.pair("a", "", width=SIZE, height=SIZE, options={"prompt_2": " ".join(["b"] * 90)})
    assert two["crossattn"].shape == (1, 154, 80)


def test_vae_override_and_sdxl_default_size(base, tmp_path):
    """A separate VAE (e.g. a fixed fp16 SDXL VAE) replaces the folder's, as for SD 1.x/2.x."""
    import shutil

    folder, pipe, _ = base
    other = tmp_path / "vae"
    shutil.copytree(folder / "vae", other)
    swapped = sdengine.load_pipeline(folder, device="cpu", vae=other)
    assert isinstance(swapped, SDXLPipeline)
    assert swapped.vae.config.scaling_factor == pytest.approx(0.13025)
    a = _ours(pipe, "euler").arrays
    b = _ours(swapped, "euler").arrays
    assert _mad(a, b) == 0.0
    from sdengine.models.unet_sdxl import SDXL_BASE

    assert SDXL_BASE.sample_size * 8 == 1024  # the real model's default size through Pipeline.default_size


def test_hand_off_infotext_names_a_separate_vae(base, refiner, tmp_path):
    """An SDXL model loaded with a separate VAE (``--vae``): its infotext had no "VAE" / "VAE hash" (the SDXL
    loader dropped the VAE's source; SD 1.x/2.x name it), so ``--from-png`` ran again with the folder's VAE. In a
    hand-off the refiner's VAE decodes: it is the one named."""
    import shutil

    _, b_pipe, _ = base
    r_folder, r_pipe, _ = refiner
    other = tmp_path / "fixed-vae"
    shutil.copytree(r_folder / "vae", other)
    swapped = sdengine.load_pipeline(r_folder, device="cpu", vae=other)
    kw = dict(switch_at=0.6, steps=3, sampler="euler", schedule="normal", seed=SEED, width=SIZE, height=SIZE)
    res = b_pipe.generate_with_refiner(swapped, PROMPT, progress=False, **kw)
    assert f"VAE hash: {swapped.vae_hash()}, VAE: fixed-vae" in res.infotexts[0], res.infotexts[0]
    assert "VAE" not in b_pipe.generate_with_refiner(r_pipe, PROMPT, progress=False, **kw).infotexts[0]
    plain = swapped(PROMPT, steps=2, width=SIZE, height=SIZE, progress=False).infotexts[0]
    assert f"VAE hash: {swapped.vae_hash()}, VAE: fixed-vae" in plain, plain


def test_cli_prompt_2_reaches_the_second_encoder(base, tmp_path):
    """`sdengine generate --prompt-2` equals the Python call with sdxl={"prompt_2": ...}."""
    from PIL import Image

    from sdengine.cli import main

    folder, pipe, _ = base
    out = tmp_path / "a.png"
    args = ["generate", PROMPT, "--model", str(folder), "--steps", "3", "--seed", "5", "--sampler", "euler"]
    assert main([*args, "--schedule", "normal", "--prompt-2", "a pear", "--out", str(out), "--no-progress"]) == 0
    got = np.asarray(Image.open(out), dtype=np.float64) / 255
    want = pipe(
        PROMPT, steps=3, seed=5, sampler="euler", schedule="normal", sdxl={"prompt_2": "a pear"}, progress=False
    )
    same = pipe(PROMPT, steps=3, seed=5, sampler="euler", schedule="normal", progress=False)
    assert np.abs(got - np.asarray(want.images[0], dtype=np.float64) / 255).max() == 0.0
    assert np.abs(got - np.asarray(same.images[0], dtype=np.float64) / 255).mean() > 1e-3


def test_batch_rows_equal_the_same_seed_alone(base):
    """The seed contract holds for SDXL: row i of a batch is the image of seed + i made alone."""
    _, pipe, _ = base
    batch = _ours(pipe, "euler_a", batch_size=2).arrays
    alone = _ours(pipe, "euler_a", seed=SEED + 1).arrays
    assert _mad(batch[1:], alone) < 1e-6


def test_cli_refiner_hand_off(base, refiner, tmp_path, tiny_sd1_folder, capsys):
    """`sdengine generate --refiner R --refiner-switch-at F` equals generate_with_refiner."""
    from PIL import Image

    from sdengine.cli import main

    b_folder, b_pipe, _ = base
    r_folder, r_pipe, _ = refiner
    out = tmp_path / "r.png"
    args = ["generate", PROMPT, "--model", str(b_folder), "--refiner", str(r_folder), "--refiner-switch-at", "0.6"]
    args += ["--steps", "5", "--seed", "2", "--sampler", "euler", "--schedule", "normal", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    got = np.asarray(Image.open(out), dtype=np.float64)
    want = b_pipe.generate_with_refiner(
        r_pipe, PROMPT, switch_at=0.6, steps=5, seed=2, sampler="euler", schedule="normal", progress=False
    )
    assert np.abs(got - np.asarray(want.images[0], dtype=np.float64)).max() == 0.0
    assert "Refiner switch at: 0.6" in Image.open(out).info["parameters"]
    # an SD 1.x model is no SDXL refiner: one line and a non-zero exit
    rc = main(["generate", PROMPT, "--model", str(b_folder), "--refiner", str(tiny_sd1_folder), "--steps", "2"])
    assert rc != 0 and "both must be SDXL" in capsys.readouterr().err


@pytest.mark.parametrize(("width", "height"), [(32, 32), (64, 32)])
def test_comfyui_latent_sampling_takes_the_latents_size_as_the_pipeline_does(base, width, height):
    """ComfyUI's samplers give a plain CLIPTextEncode the latent's size as SDXL's size numbers; sdengine's
    ComfyUI path once used the training size (another image than the native API's, 1.6/255 mean abs)."""
    from sdengine.latent_sampling import encode_text, sample_latents
    from sdengine.pipeline.request import GenerationRequest

    _, pipe, _ = base
    args = {"steps": 3, "sampler": "euler", "schedule": "normal", "cfg_scale": 5.0, "seed": SEED}
    req = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, **args)
    with torch.inference_mode():
        want = pipe.sample_latents(pipe.prepare(req))
        empty = torch.zeros(1, 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        got = sample_latents(
            pipe, [encode_text(pipe, PROMPT)], [encode_text(pipe, NEGATIVE)], empty, seed=SEED, steps=3, cfg=5.0,
            sampler="euler", schedule="normal",
        )  # fmt: skip
    assert float((got.cpu() - want.cpu()).abs().max()) < 1e-5


def test_sdxl_settings_are_written_to_the_infotext_and_read_back(base, tmp_path):
    """prompt_2 and the size numbers change the image: the infotext carries them ("SDXL options"), so that
    --from-png regenerates the same image (it used to regenerate the default-settings image, silently)."""
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, save_png, to_generate_kwargs

    folder, pipe, _ = base
    sdxl = {"prompt_2": "oil painting, a pear: ripe", "original_size": [64, 48], "crops_coords_top_left": [4, 8]}
    made = _ours(pipe, "euler", sdxl=sdxl)
    text = made.infotexts[0]
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["sdxl"] == sdxl
    again = pipe(kwargs.pop("prompt"), kwargs.pop("negative_prompt"), progress=False, **kwargs)
    assert _mad(again.arrays, made.arrays) == 0.0
    assert _mad(_ours(pipe, "euler").arrays, made.arrays) > 1e-3  # the settings matter
    assert "SDXL options" not in _ours(pipe, "euler").infotexts[0]  # defaults write nothing
    # the CLI: --from-png reads them, and --prompt-2 replaces only the prompt_2 of them
    png = tmp_path / "made.png"
    save_png(made.images[0], png, text)
    out = tmp_path / "again.png"
    args = ["generate", "--from-png", str(png), "--model", str(folder), "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    assert np.abs(np.asarray(Image.open(out), np.float64) - np.asarray(made.images[0], np.float64)).max() == 0.0
    out2 = tmp_path / "other.png"
    assert main([*args, "--prompt-2", "a plum", "--out", str(out2)]) == 0
    got = to_generate_kwargs(parse_parameters(Image.open(out2).info["parameters"]))["sdxl"]
    assert got == {**sdxl, "prompt_2": "a plum"}
    from sdengine.metadata import MetadataError

    line = "a\nSteps: 2, Seed: 1, Size: 32x32, SDXL options: "
    for bad in ("not json", "[1]", "{}"):
        with pytest.raises(MetadataError, match="SDXL options"):
            to_generate_kwargs(parse_parameters(line + json.dumps(bad)))
    kwargs = to_generate_kwargs(parse_parameters(line + json.dumps(json.dumps({"target_size": 7}))))
    with pytest.raises(GenerationError, match="target_size must be two integers"):
        pipe(kwargs.pop("prompt"), kwargs.pop("negative_prompt"), progress=False, **kwargs)


@pytest.mark.parametrize(("layer", "diffusers_clip_skip"), [(None, None), (-2, None), (-1, -1), (-3, 1)])
def test_comfyui_clip_set_last_layer_reads_comfyuis_sdxl_layer(base, layer, diffusers_clip_skip):
    """ComfyUI's SDXL text encoders read ``hidden_states[stop_at_clip_layer]`` (raw), default -2: a workflow's
    CLIPSetLastLayer -2 is SDXL's own penultimate layer. sdengine once took -2 as clip skip 2 (one layer
    deeper, hidden_states[-3]) and -1 as the penultimate layer."""
    from sdengine.server.comfy.nodes import ClipHandle, RunContext, clip_set_last_layer, clip_text_encode

    _, pipe, ref = base
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    clip = ClipHandle("x")
    if layer is not None:
        (clip,) = clip_set_last_layer(ctx, clip, layer)
    with torch.inference_mode():
        (got,) = clip_text_encode(ctx, PROMPT, clip)[0]
    with torch.no_grad():
        want, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", clip_skip=diffusers_clip_skip)
    assert float((got.cond["crossattn"] - want).abs().max()) <= 1e-5
    assert float((got.cond["pooled_text"] - pooled).abs().max()) <= 1e-5


def test_from_png_of_a_refiner_image_runs_the_hand_off_again(base, refiner, tmp_path, monkeypatch, capsys):
    """`--from-png` of an image made with `--refiner` (A1111's "Refiner: NAME [hash], Refiner switch at: F")
    makes it again with the refiner and its switch; it once warned and made the base model's image alone."""
    from PIL import Image

    from sdengine.cli import main

    b_folder, b_pipe, _ = base
    r_folder, r_pipe, _ = refiner
    made = tmp_path / "made.png"
    args = ["generate", PROMPT, "--model", str(b_folder), "--refiner", str(r_folder), "--refiner-switch-at", "0.6"]
    args += ["--steps", "5", "--seed", "2", "--sampler", "euler", "--schedule", "normal", "--no-progress"]
    assert main([*args, "--out", str(made)]) == 0
    want = np.asarray(Image.open(made), dtype=np.float64)
    again = ["generate", "--from-png", str(made), "--model", str(b_folder), "--no-progress"]
    # the recorded refiner's name is no path here: one line asking for --refiner, nothing made
    assert main([*again, "--out", str(tmp_path / "x.png")]) != 0
    assert "made with the refiner 'tiny-sdxl-refiner [" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    # --refiner given: the switch comes from the PNG
    assert main([*again, "--refiner", str(r_folder), "--out", str(tmp_path / "a.png")]) == 0
    assert np.abs(np.asarray(Image.open(tmp_path / "a.png"), dtype=np.float64) - want).max() == 0.0
    # both names are paths from here: the PNG alone makes the image
    (tmp_path / "tiny-sdxl").symlink_to(b_folder)
    (tmp_path / "tiny-sdxl-refiner").symlink_to(r_folder)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--from-png", "made.png", "--no-progress", "--out", "b.png"]) == 0
    assert np.abs(np.asarray(Image.open(tmp_path / "b.png"), dtype=np.float64) - want).max() == 0.0
    assert "not reproduced" not in capsys.readouterr().err
    # an explicit --refiner-switch-at wins over the PNG's
    assert main(["generate", "--from-png", "made.png", "--refiner-switch-at", "0.3", "--out", "c.png"]) == 0
    assert "Refiner switch at: 0.3" in Image.open(tmp_path / "c.png").info["parameters"]


def test_from_png_of_an_a1111_refiner_image_runs_a1111s_switch_rule(base, refiner, tmp_path, monkeypatch):
    """A1111 hands off to the refiner at its own step (apply_refiner: the first step whose sigma's nearest
    timestep t has (999 - t) / 1000 >= switch), not diffusers' (sdengine generate --refiner's); `--from-png` of an
    A1111 PNG ran diffusers' rule: another image. The rule is now the infotext's: sdengine's "Refiner switch rule"
    (the server writes "a1111"), else A1111's in an infotext not made by sdengine, diffusers' in an sdengine one;
    A1111's PNG without "Refiner switch at" (its None) runs the refiner from the first step."""
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, save_png

    b_folder, b_pipe, _ = base
    r_folder, r_pipe, _ = refiner
    kw = dict(steps=5, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="karras")
    kw["progress"] = False
    (tmp_path / "tiny-sdxl").symlink_to(b_folder)
    (tmp_path / "tiny-sdxl-refiner").symlink_to(r_folder)
    monkeypatch.chdir(tmp_path)

    def made(rule, switch):
        return b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=switch, switch_rule=rule, **kw)

    from sdengine.diffusion.sampling import make_grid
    from sdengine.pipeline.sdxl import switch_step

    grid = make_grid("euler", 5, b_pipe.noise_schedule, "karras", b_pipe.scheduler_config)
    # a switch where the two rules pick other steps (at a fractional Karras timestep t: past (1 - x) * 1000 for
    # diffusers, nearest to 999 - 1000 x for A1111)
    candidates = [k / 1000 for k in range(1, 1000)]
    switch = next(
        x
        for x in candidates
        if switch_step(grid, b_pipe.noise_schedule, x) != switch_step(grid, b_pipe.noise_schedule, x, "a1111")
    )
    ours, theirs = made("a1111", switch), made("diffusers", switch)  # each run once, read below
    assert not np.array_equal(ours.arrays, theirs.arrays)
    text = ours.infotexts[0]
    assert "Refiner switch rule: a1111" in text
    a1111_text = (
        text.replace(", Refiner switch rule: a1111", "").split(", Version:")[0] + ", RNG: CPU, Version: v1.10.1"
    )
    assert "Refiner: tiny-sdxl-refiner" in a1111_text and f"Refiner switch at: {switch}" in a1111_text
    blank = Image.new("RGB", (SIZE, SIZE))
    for name, infotext, want in (
        ("a1111.png", a1111_text, ours),  # A1111's own: its rule
        ("ours.png", text, ours),  # sdengine's with the rule written (the server's)
        ("diffusers.png", theirs.infotexts[0], theirs),  # sdengine's CLI
        ("none.png", a1111_text.replace(f", Refiner switch at: {switch}", ""), made("a1111", 0.0)),
    ):
        save_png(blank, tmp_path / name, infotext)
        assert main(["generate", "--from-png", name, "--no-progress", "--out", f"out-{name}"]) == 0, name
        got = np.asarray(Image.open(tmp_path / f"out-{name}"), dtype=np.float64)
        assert np.abs(got - np.asarray(want.images[0], np.float64)).max() == 0.0, name
    assert "Refiner switch rule" not in theirs.infotexts[0]
    assert parse_parameters(Image.open(tmp_path / "out-a1111.png").info["parameters"])["Refiner switch rule"] == "a1111"


def test_comfyui_sdxl_text_encode_nodes_give_the_pipelines_conditioning(base, refiner):
    """ComfyUI's CLIPTextEncodeSDXL (text_g / text_l, explicit sizes) and CLIPTextEncodeSDXLRefiner (aesthetic
    score) sample the latents of the pipeline's prompt_2 and size / score settings; once unknown nodes."""
    from sdengine.errors import SdengineError
    from sdengine.latent_sampling import sample_latents
    from sdengine.pipeline.request import GenerationRequest
    from sdengine.server.comfy.nodes import NODES, ClipHandle, RunContext

    sdxl, sdxl_refiner = NODES["CLIPTextEncodeSDXL"].fn, NODES["CLIPTextEncodeSDXLRefiner"].fn
    args = {"steps": 3, "sampler": "euler", "schedule": "normal", "seed": SEED}
    for (_, pipe, _), is_refiner in ((base, False), (refiner, True)):
        ctx = RunContext(pipeline=lambda ref, pipe=pipe: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
        clip = ClipHandle("x")
        if is_refiner:
            (pos,) = sdxl_refiner(ctx, ascore=7.0, width=48, height=40, text=PROMPT, clip=clip)[0]
            (neg,) = sdxl_refiner(ctx, ascore=2.0, width=48, height=40, text=NEGATIVE, clip=clip)[0]
            options = {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0, "original_size": [40, 48]}
        else:
            sizes = {"width": 48, "height": 40, "crop_w": 4, "crop_h": 8, "target_width": 24, "target_height": 16}
            (pos,) = sdxl(ctx, clip=clip, text_g="a pear", text_l=PROMPT, **sizes)[0]
            (neg,) = sdxl(ctx, clip=clip, text_g="dark", text_l=NEGATIVE, **sizes)[0]
            options = {"prompt_2": "a pear", "negative_prompt_2": "dark", "original_size": [40, 48]}
            options.update(crops_coords_top_left=[8, 4], target_size=[16, 24], negative_crops_coords_top_left=[8, 4])
        req = GenerationRequest(
            prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, cfg_scale=5.0, sdxl=options, **args
        )
        with torch.inference_mode():
            want = pipe.sample_latents(pipe.prepare(req))
            empty = torch.zeros(1, 4, SIZE // 2, SIZE // 2)
            got = sample_latents(pipe, [pos], [neg], empty, cfg=5.0, **args)
            plain = pipe.sample_latents(pipe.prepare(req.replace(sdxl=None)))
        assert float((got - want).abs().max()) < 1e-5
        assert float((plain - want).abs().mean()) > 1e-3  # the settings matter
        # the other model's node: one clear error
        with pytest.raises(SdengineError, match="CLIPTextEncodeSDXL"):
            if is_refiner:
                sdxl(ctx, clip, 8, 8, 0, 0, 8, 8, "a", "b")
            else:
                sdxl_refiner(ctx, 6.0, 8, 8, "a", clip)


@pytest.mark.parametrize("flags", [["--refiner", "some-refiner"], ["--refiner-switch-at", "0.7"]])
def test_a_prompt_list_refuses_the_refiner_flags(tmp_path, capsys, flags):
    """`generate --prompts FILE --refiner R` rendered the list with the base model alone, the refiner dropped
    silently; the hand-off is one call at a time: one line naming the flag, nothing loaded or written."""
    from sdengine.cli import main

    listing = tmp_path / "list.txt"
    listing.write_text("an apple\na pear\n")
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(listing), *flags, "--out", str(out), "--no-progress"]) != 0
    assert f"drop {flags[0]}" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_align_your_steps_walks_the_sdxl_table_on_an_sdxl_model(base):
    """A1111's "Align Your Steps" picks the paper's SDXL noise levels on an SDXL model (the SD 1.5 ones elsewhere);
    the infotext names it as A1111 does."""
    _, pipe, _ = base
    seen: list[float] = []
    r = _ours(pipe, "euler", schedule="Align Your Steps", steps=10, callback=lambda info: seen.append(info.sigma))
    sdxl_levels = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141]
    sdxl_levels += [0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177]
    np.testing.assert_allclose(seen, sdxl_levels, rtol=1e-5)
    assert "Schedule type: Align Your Steps," in r.infotexts[0]


def test_the_hires_pass_of_an_sdxl_model_takes_its_align_your_steps_table_too(base):
    _, pipe, _ = base
    seen: list[tuple[int, float]] = []
    _ours(
        pipe,
        "euler",
        steps=2,
        enable_hr=True,
        hr_scale=1.5,
        hr_second_pass_steps=10,
        hr_schedule="Align Your Steps",
        strength=1.0,
        callback=lambda info: seen.append((info.steps, info.sigma)),
    )
    second = [s for _, s in seen[2:]]  # the callback counts both passes' steps: 2 + 10
    assert len(second) == 10 and all(n == 12 for n, _ in seen)
    np.testing.assert_allclose(second[:3], [14.6146412293, 6.3184485287, 3.7681790315], rtol=1e-5)


def test_comfyui_clip_set_last_layer_past_clip_l_is_a_node_error(base):
    """ComfyUI reads CLIP-L's last layer with its final LayerNorm for a stop_at_clip_layer past its depth, which
    the SDXL encoder here does not give: a node error naming the layer and the depth, not sdengine's clip_skip."""
    from sdengine.server.comfy.nodes import ClipHandle, NodeError, RunContext, clip_set_last_layer, clip_text_encode

    _, pipe, _ = base
    n = int(pipe.conditioner.text_encoder.config.num_hidden_layers)
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    (clip,) = clip_set_last_layer(ctx, ClipHandle("x"), -(n + 1))
    with pytest.raises(NodeError, match=rf"^stop_at_clip_layer -{n + 1} is past .*CLIP-L depth of {n} layers"):
        clip_text_encode(ctx, PROMPT, clip)


@pytest.mark.slow
def test_a1111_switch_leaving_a_model_no_steps_runs_the_other_alone(base, refiner, a1111_sdxl):
    """A1111's apply_refiner checks the switch before each step: a hires pass starting past the switch runs the
    refiner on every step (it was a failed job, "leaves no steps of the img2img's steps ... for the base"), and a
    switch no step reaches runs the base alone and writes no Refiner field (it was a failed job too); a switch at
    0 runs the refiner on every step (it was a 400)."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw, hires = _a1111_hires_kw()
    kw["strength"] = hires["denoising_strength"] = 0.15
    r, image, info = a1111_sdxl(**hires, refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.8)
    assert r.status_code == 200, r.text
    want = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.8, switch_rule="a1111", **kw)
    assert np.abs(image - np.asarray(want.images[0], np.float64)).max() == 0.0
    alone = np.asarray(b_pipe(PROMPT, NEGATIVE, **kw).images[0], np.float64)
    assert np.abs(image - alone).mean() > 1.0
    assert "Refiner: tiny-sdxl-refiner" in info["infotexts"][0] and "Refiner switch at: 0.8" in info["infotexts"][0]
    # at 0 the refiner runs every step: its own txt2img (it was a 400)
    r, image, info = a1111_sdxl(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0)
    assert r.status_code == 200, r.text
    kw = dict(steps=5, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
    own = r_pipe(PROMPT, NEGATIVE, progress=False, **kw)
    assert np.abs(image - np.asarray(own.images[0], np.float64)).max() == 0.0
    assert "Refiner switch at: 0" in info["infotexts"][0]
    # past the last step (t 0 of the txt2img's last step is 0.999): the base's image, no Refiner field
    r, image, info = a1111_sdxl(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.9995)
    assert r.status_code == 200, r.text
    _, plain, _ = a1111_sdxl()
    assert np.abs(image - plain).max() == 0.0
    assert "Refiner" not in info["infotexts"][0]


@pytest.mark.slow
def test_cli_hires_refiner_pass_and_hr_checkpoint_run_again_from_png(base, refiner, tmp_path, monkeypatch, capsys):
    """`--hr-refiner-pass` (A1111's hires_fix_refiner_pass) and `--hr-checkpoint` (its hr_checkpoint_name) give
    the Python call's image; `--from-png` of it reads "Hires refiner" and "Hires checkpoint" back and makes the
    same pixels (the CLI had neither: it warned and made another image)."""
    from PIL import Image

    from sdengine.cli import main

    b_folder, b_pipe, _ = base
    r_folder, r_pipe, _ = refiner
    (tmp_path / "tiny-sdxl").symlink_to(b_folder)
    (tmp_path / "tiny-sdxl-refiner").symlink_to(r_folder)
    monkeypatch.chdir(tmp_path)
    args = ["generate", PROMPT, "--model", "tiny-sdxl", "--refiner", "tiny-sdxl-refiner", "--refiner-switch-at", "0.6"]
    args += ["--steps", "3", "--seed", "2", "--sampler", "euler", "--schedule", "normal", "--no-progress"]
    args += ["--hires", "--strength", "0.6", "--hr-refiner-pass", "first", "--hr-checkpoint", "tiny-sdxl-refiner"]
    assert main([*args, "--out", "made.png"]) == 0
    want = np.asarray(Image.open("made.png"), dtype=np.float64)
    text = Image.open("made.png").info["parameters"]
    assert "Hires refiner: first pass" in text and "Hires checkpoint: tiny-sdxl-refiner [" in text
    kw = dict(steps=3, seed=2, sampler="euler", schedule="normal", width=SIZE, height=SIZE, progress=False)
    kw.update(enable_hr=True, strength=0.6)
    py = b_pipe.generate_with_refiner(r_pipe, PROMPT, switch_at=0.6, hires_pass="first pass", hr_model=r_pipe, **kw)
    assert np.abs(np.asarray(py.images[0], np.float64) - want).max() == 0.0
    alone = b_pipe.generate_with_refiner(r_pipe, PROMPT, switch_at=0.6, hires_pass="first pass", **kw)
    assert np.abs(np.asarray(alone.images[0], np.float64) - want).mean() > 1.0  # the flags change the image
    capsys.readouterr()
    assert main(["generate", "--from-png", "made.png", "--no-progress", "--out", "again.png"]) == 0
    assert np.abs(np.asarray(Image.open("again.png"), dtype=np.float64) - want).max() == 0.0
    assert "not reproduced" not in capsys.readouterr().err
    # a recorded hires model that is no path here: one line asking for --hr-checkpoint, nothing made
    Image.open("made.png").save(
        "moved.png", pnginfo=_pnginfo(text.replace("Hires checkpoint: ", "Hires checkpoint: x"))
    )
    assert main(["generate", "--from-png", "moved.png", "--no-progress", "--out", "x.png"]) != 0
    assert "give --hr-checkpoint" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_cli_hires_model_flags_are_refused_where_they_change_nothing(tmp_path, monkeypatch, capsys):
    """`--hr-checkpoint` / `--hr-refiner-pass` without what they apply to, or a pass A1111 lacks, are one line
    before any model loads; `--outpaint` (the model alone) refuses them and `--refiner` (once dropped silently)."""
    from PIL import Image

    from sdengine.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", PROMPT, "--hr-checkpoint", "tiny-sdxl", "--out", "y.png"]) != 0
    assert "--hr-checkpoint has no effect without the hires fix" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--hires", "--hr-refiner-pass", "both", "--out", "y.png"]) != 0
    assert "--hr-refiner-pass has no effect without the hires fix and --refiner" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--hires", "--refiner", "r", "--hr-refiner-pass", "third", "--out", "y.png"]) != 0
    assert "--hr-refiner-pass must be one of first, second, both" in capsys.readouterr().err
    Image.new("RGB", (16, 16)).save("in.png")
    for flag in ("--refiner", "--hr-checkpoint"):
        assert (
            main(
                [
                    "generate",
                    PROMPT,
                    "--init-image",
                    "in.png",
                    "--outpaint",
                    "8",
                    "--hires",
                    flag,
                    "m",
                    "--out",
                    "o.png",
                ]
            )
            != 0
        )
        assert f"--outpaint runs --model alone: drop {flag}" in capsys.readouterr().err
    assert not list(tmp_path.glob("[oy].png"))


def _pnginfo(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


def test_a_switch_leaving_one_model_no_steps_is_the_other_models_own_run(base, refiner):
    """A1111's apply_refiner switches before a step or never: switch_at 0 runs the refiner on every step (its own
    txt2img, to the pixel), a switch no step reaches the base alone (its own image, no Refiner field, a note).
    Both were GenerationErrors ("switch_at must be a number in (0, 1)", "leaves no steps for the refiner")."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    kw = dict(steps=2, sampler="euler", schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    kw["progress"] = False
    got = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0, **kw)
    assert np.abs(got.arrays - r_pipe(PROMPT, NEGATIVE, **kw).arrays).max() == 0.0
    assert "Refiner switch at: 0" in got.infotexts[0]
    got = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.9995, switch_rule="a1111", **kw)
    plain = b_pipe(PROMPT, NEGATIVE, **kw)
    assert np.abs(got.arrays - plain.arrays).max() == 0.0
    assert "Refiner" not in got.infotexts[0] and any("ran alone" in n for n in got.notes), got.notes


def test_zero_terminal_snr_hand_off_runs_both_models_on_a1111s_schedule(base, refiner):
    """A1111's Zero Terminal SNR reaches a base -> refiner hand-off: the base starts at the rescaled schedule's
    terminal sigma, the infotext says so, and both models walk their own schedules again afterwards."""
    _, b_pipe, _ = base
    _, r_pipe, _ = refiner
    sigmas: list[float] = []
    kw = dict(switch_at=0.7, steps=4, sampler="euler", schedule="uniform", seed=SEED, width=SIZE, height=SIZE)
    res = b_pipe.generate_with_refiner(
        r_pipe,
        PROMPT,
        NEGATIVE,
        zero_terminal_snr=True,
        progress=False,
        callback=lambda i: sigmas.append(i.sigma),
        **kw,
    )
    assert sigmas[0] > 4500 and "Noise Schedule: Zero Terminal SNR" in res.infotexts[0]
    assert b_pipe.noise_schedule is b_pipe.base_schedule and r_pipe.noise_schedule is r_pipe.base_schedule
