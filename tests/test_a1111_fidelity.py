"""Fidelity to AUTOMATIC1111 where its meaning of a setting differs from sdengine's own: its "Clip skip"
(``CLIP_stop_at_last_layers``, applied to SD 1.x's CLIP only), its timestep samplers' img2img step count
(DDIM, PLMS, UniPC), its inpainting at denoising strength 1 (the init latent noised, not pure noise), and its and
ComfyUI's "discard next-to-last sigma" (tests/test_discard_penultimate.py has the grids' numbers)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from _pipeline_models import picture
from _sdxl_models import make_sdxl_folder
from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import A1111_TIMESTEP_SAMPLERS, hires_steps, img2img_start
from sdengine.metadata import parse_parameters, save_png, to_generate_kwargs
from sdengine.pipeline import GenerationError, load_pipeline

FAST = {"steps": 3, "sampler": "euler", "schedule": "normal", "cfg_scale": 5.0, "seed": 7, "progress": False}
A1111_VERSION = "Version: v1.10.1"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = make_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
    return folder, sdengine.load_pipeline(folder, device="cpu")


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return load_pipeline(tiny_sd1_folder, device="cpu")


# ------------------------------------------------------------------------------------------------ clip skip


def test_a1111_clip_skip_is_ignored_on_sdxl_as_a1111_does(sdxl):
    """A1111 reads SDXL's trained layers whatever its Clip skip (sdxl_clip_l_skip off, its default); sdengine
    applied it to both encoders, so an A1111 SDXL image with "Clip skip: 2" came out another image."""
    _, pipe = sdxl
    plain = pipe("a red apple", width=32, height=32, **FAST)
    a1111 = pipe("a red apple", width=32, height=32, clip_skip=2, clip_skip_rule="a1111", **FAST)
    native = pipe("a red apple", width=32, height=32, clip_skip=2, **FAST)
    np.testing.assert_array_equal(a1111.arrays, plain.arrays)
    assert not np.array_equal(native.arrays, plain.arrays)  # sdengine's own clip_skip still reads a deeper layer
    assert any("Clip skip 2 not applied" in n and "SD 1.x" in n for n in a1111.notes), a1111.notes
    fields = parse_parameters(a1111.infotexts[0])
    assert fields["Clip skip"] == "2" and fields["Clip skip rule"] == "a1111"
    own = parse_parameters(native.infotexts[0])
    assert own["Clip skip"] == "2" and "Clip skip rule" not in own


def test_sdxl_clip_skip_round_trips_through_the_infotext(sdxl, tmp_path):
    """Each image's infotext says which Clip skip it had: an A1111 PNG's is A1111's (ignored on SDXL), an
    sdengine PNG's its own (0, the last layer, is written too: it was dropped as if it were the default)."""
    folder, pipe = sdxl
    text_a1111 = (
        f"a red apple\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 32x32, Clip skip: 2, {A1111_VERSION}"
    )
    kw = to_generate_kwargs(parse_parameters(text_a1111))
    assert kw["clip_skip"] == 2 and kw["clip_skip_rule"] == "a1111"
    assert kw["noise_source"] == "nv"  # no "RNG": A1111's GPU source
    plain = pipe("a red apple", width=32, height=32, noise_source="nv", **FAST)
    np.testing.assert_array_equal(pipe(**{**kw, "progress": False}).arrays, plain.arrays)
    for skip in (0, 2):
        own = pipe("a red apple", width=32, height=32, clip_skip=skip, **FAST)
        assert f"Clip skip: {skip}," in own.infotexts[0]
        back = to_generate_kwargs(parse_parameters(own.infotexts[0]))
        assert back["clip_skip"] == skip and back.get("clip_skip_rule", "sdengine") == "sdengine"
        np.testing.assert_array_equal(pipe(**{**back, "progress": False}).arrays, own.arrays)
    a1111 = pipe("a red apple", width=32, height=32, clip_skip=2, clip_skip_rule="a1111", **FAST)
    again = to_generate_kwargs(parse_parameters(a1111.infotexts[0]))
    assert again["clip_skip_rule"] == "a1111" and "noise_source" not in again  # sdengine's own: its cpu noise
    plain_cpu = pipe("a red apple", width=32, height=32, **FAST)
    np.testing.assert_array_equal(pipe(**{**again, "progress": False}).arrays, plain_cpu.arrays)
    # the CLI: an A1111 SDXL PNG regenerates without the skip; --clip-skip is sdengine's own
    from sdengine.cli import main

    png = save_png(Image.new("RGB", (32, 32)), tmp_path / "a1111.png", text_a1111)
    out = tmp_path / "out.png"
    assert main(["generate", "--from-png", str(png), "--model", str(folder), "--out", str(out), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(plain.images[0]))
    forced = tmp_path / "forced.png"
    cmd = ["generate", "--from-png", str(png), "--model", str(folder), "--clip-skip", "2", "--no-progress"]
    assert main([*cmd, "--out", str(forced)]) == 0
    native = pipe("a red apple", width=32, height=32, clip_skip=2, noise_source="nv", **FAST)  # the PNG's noise
    np.testing.assert_array_equal(np.asarray(Image.open(forced)), np.asarray(native.images[0]))


def test_a1111_clip_skip_applies_to_sd1_and_not_to_sd2(sd1, tiny_sd2_folder):
    """A1111 applies CLIP_stop_at_last_layers to SD 1.x's CLIP (as sdengine does) and never to SD 2.x's
    OpenCLIP (its FrozenOpenCLIPEmbedderWithCustomWords reads the penultimate layer, fixed)."""
    a = sd1("a red apple", clip_skip=2, clip_skip_rule="a1111", **FAST)
    b = sd1("a red apple", clip_skip=2, **FAST)
    np.testing.assert_array_equal(a.arrays, b.arrays)
    assert not any("Clip skip" in n for n in a.notes)
    sd2 = load_pipeline(tiny_sd2_folder, device="cpu")
    plain = sd2("a red apple", **FAST)
    a1111 = sd2("a red apple", clip_skip=2, clip_skip_rule="a1111", **FAST)
    np.testing.assert_array_equal(a1111.arrays, plain.arrays)
    assert not np.array_equal(sd2("a red apple", clip_skip=2, **FAST).arrays, plain.arrays)
    assert any("Clip skip 2 not applied" in n and "OpenCLIP" in n for n in a1111.notes), a1111.notes


def test_a1111_clip_skip_does_not_break_a_minilm_model(tiny_emoji_folder):
    """A1111's option applies only where there are CLIP layers: a MiniLM model runs as at clip skip 1 (its own
    clip_skip 2 stays a one-line error)."""
    pipe = load_pipeline(tiny_emoji_folder, device="cpu")
    plain = pipe("a cat", **FAST)
    got = pipe("a cat", clip_skip=2, clip_skip_rule="a1111", **FAST)
    np.testing.assert_array_equal(got.arrays, plain.arrays)
    assert any("MiniLM" in n for n in got.notes)
    with pytest.raises(GenerationError, match="clip_skip 2 does not apply"):
        pipe("a cat", clip_skip=2, **FAST)
    with pytest.raises(GenerationError, match="unknown clip_skip_rule 'comfy'; use one of: sdengine, a1111"):
        pipe("a cat", clip_skip_rule="comfy", **FAST)


def test_an_a1111_infotext_is_read_with_a1111s_meanings(caplog):
    """An infotext not made by sdengine has A1111's meanings (its img2img step count, its Clip skip); an
    sdengine one has sdengine's unless its fields say otherwise."""
    body = "Steps: 20, Sampler: Euler, Seed: 1, Size: 64x64, Denoising strength: 0.5, Clip skip: 2"
    for version in (A1111_VERSION, "Version: f2.0.1v1.10.1", ""):
        kw = to_generate_kwargs(parse_parameters(f"a cat\n{body}, {version}".rstrip(", ")))
        assert kw["strength_rule"] == kw["clip_skip_rule"] == "a1111", version
    kw = to_generate_kwargs(parse_parameters(f"a cat\n{body}, Version: sdengine 0.1.0"))
    assert "strength_rule" not in kw and "clip_skip_rule" not in kw
    with caplog.at_level(logging.WARNING, logger="sdengine.metadata"):
        kw = to_generate_kwargs(parse_parameters(f"a cat\n{body}, Clip skip rule: a1111, Version: sdengine 0.1.0"))
    assert kw["clip_skip_rule"] == "a1111" and caplog.records == []
    with pytest.raises(ValueError, match="Clip skip rule: 'x' is not one of sdengine, a1111"):
        to_generate_kwargs(parse_parameters(f"a cat\n{body}, Clip skip rule: x"))


# ---------------------------------------------------------------------------------------- img2img step count


def a1111_timestep_img2img(steps: int, strength: float) -> tuple[int, int]:
    """A1111's modules/sd_samplers_timesteps.py sample_img2img, written out on sdengine's descending grid:
    it noises the init to ``timesteps[t_enc]`` and steps from ``timesteps[t_enc - 1]`` (ascending
    ``timesteps[:t_enc]``) down; (first index, steps run), at least the last step."""
    t_enc = int(min(strength, 0.999) * steps)
    run = max(t_enc, 1)
    return steps - run, run


@pytest.mark.parametrize("sampler", A1111_TIMESTEP_SAMPLERS)
@pytest.mark.parametrize("steps,strength", [(20, 0.75), (20, 0.0), (20, 1.0), (20, 0.05), (3, 0.5), (7, 0.29)])
def test_a1111_timestep_samplers_count_img2img_steps_as_a1111(sampler, steps, strength):
    first, run = a1111_timestep_img2img(steps, strength)
    assert img2img_start(steps, strength, "a1111", sampler) == first
    # A1111's k-diffusion samplers run one step more (sigmas[steps - t_enc - 1:])
    t_enc = int(min(strength, 0.999) * steps)
    assert img2img_start(steps, strength, "a1111", "euler") == steps - t_enc - 1
    assert img2img_start(steps, strength, "a1111") == steps - t_enc - 1
    # hires: setup_img2img_steps' fixed-steps branch (t_enc = steps - 1) on int(steps / strength) steps
    if strength > 0:
        total = int(steps / min(strength, 0.999))
        assert hires_steps(steps, strength, "a1111", sampler) == (total, total - max(steps - 1, 1))
        assert hires_steps(steps, strength, "a1111", "euler") == (total, total - steps)


def test_a1111_ddim_img2img_runs_a1111s_steps(sd1):
    init = picture(sd1.default_size, sd1.default_size)
    seen: list[tuple[int, int]] = []
    args = {**FAST, "steps": 4, "init_image": init, "strength": 0.5, "strength_rule": "a1111"}
    ddim = sd1("a red apple", **{**args, "sampler": "ddim"}, callback=lambda i: seen.append((i.step, i.steps)))
    # t_enc = 2: A1111's DDIM noises to timesteps[2] = 501 and calls the network once, at timesteps[1] = 251,
    # landing on t = 1 (tests/test_a1111_timestep_grid.py); Euler runs 3 (sigmas[1:])
    assert seen[-1] == (1, 1)
    other = sd1("a red apple", **{**args, "sampler": "ddim", "strength": 0.5, "strength_rule": "diffusers"})
    assert not np.array_equal(ddim.arrays, other.arrays)  # diffusers' DDIM grid: 2 steps from 501 to 0
    assert "Strength rule: a1111" in ddim.infotexts[0]
    seen.clear()
    sd1("a red apple", **args, callback=lambda i: seen.append((i.step, i.steps)))
    assert seen[-1] == (3, 3)


def test_pipeline_runs_a1111s_ddim_grid_under_its_rules_and_records_it(sd1):
    """The pipeline under strength_rule "a1111" (the A1111 routes): txt2img DDIM at 3 steps gives the network
    A1111's timesteps 999, 667, 334 (diffusers': 667, 334, 1); the infotext says the rule so that the image comes
    back from it, and an A1111 infotext with DDIM is read with that rule."""
    pipe = sd1
    seen: list[float] = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1].reshape(-1)[0])))
    kw = dict(steps=3, sampler="ddim", schedule="normal", cfg_scale=5.0, seed=7, progress=False)
    try:
        a1111 = pipe("a red apple", strength_rule="a1111", **kw)
        calls = list(seen)
        seen.clear()
        plain = pipe("a red apple", **kw)
    finally:
        handle.remove()
    assert calls == [999.0, 667.0, 334.0] and seen == [667.0, 334.0, 1.0]
    assert not np.array_equal(a1111.arrays, plain.arrays)
    text = a1111.infotexts[0]
    assert "Strength rule: a1111" in text and "Strength rule" not in plain.infotexts[0]
    back = to_generate_kwargs(parse_parameters(text))
    np.testing.assert_array_equal(pipe(**{**back, "progress": False}).arrays, a1111.arrays)
    theirs = "a red apple\nSteps: 3, Sampler: DDIM, CFG scale: 5, Seed: 7, Size: 32x32, Version: v1.10.1"
    assert to_generate_kwargs(parse_parameters(theirs))["strength_rule"] == "a1111"
    assert "strength_rule" not in to_generate_kwargs(parse_parameters(theirs.replace("DDIM", "Euler")))


# ------------------------------------------------------------------------------------------------ inpainting


def half_mask(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    return mask


def test_a1111_inpainting_at_strength_1_noises_the_init_latent(sd1):
    """A1111 starts inpainting at denoising strength 1 from the init latent noised to the first sigma (and its
    latent masked content fills that latent); diffusers, sdengine's default rule, from pure noise, where the
    masked content cannot matter."""
    s = sd1.default_size
    args = {**FAST, "init_image": picture(s, s), "mask": half_mask(s), "strength": 1.0}
    pure = sd1("a red apple", **args)
    a1111 = sd1("a red apple", **args, strength_rule="a1111")
    assert not np.array_equal(a1111.arrays, pure.arrays)
    zeros = sd1("a red apple", **args, strength_rule="a1111", masked_content="latent nothing")
    assert not np.array_equal(zeros.arrays, a1111.arrays)  # the init latent is where sampling starts
    np.testing.assert_array_equal(sd1("a red apple", **args, masked_content="latent nothing").arrays, pure.arrays)
    assert parse_parameters(zeros.infotexts[0])["Masked content"] == "latent nothing"
    assert "Masked content" not in parse_parameters(a1111.infotexts[0])


def test_masked_content_is_checked_and_read_back(sd1):
    s = sd1.default_size
    with pytest.raises(GenerationError, match="unknown masked_content 'fill'; use one of: original, latent noise"):
        sd1("a", **FAST, init_image=picture(s, s), mask=half_mask(s), masked_content="fill")
    with pytest.raises(GenerationError, match="masked_content 'latent noise' needs a mask"):
        sd1("a", **FAST, init_image=picture(s, s), masked_content="latent noise")
    text = f"a\nSteps: 3, Seed: 1, Denoising strength: 1, Mask blur: 4, Masked content: latent noise, {A1111_VERSION}"
    kw = to_generate_kwargs(parse_parameters(text))
    assert kw["masked_content"] == "latent noise" and kw["strength_rule"] == "a1111"
    with pytest.raises(ValueError, match="Masked content: 'fill' is not one of original, latent noise"):
        to_generate_kwargs(parse_parameters(text.replace("latent noise", "fill")))


def test_a1111_sdxl_clip_l_skip_reaches_clip_l_only(sdxl):
    """A1111's sdxl_clip_l_skip on: its CLIP-L reads ``hidden_states[-CLIP_stop_at_last_layers]`` raw (so Clip
    skip 2 is SDXL's own layer and 1 the last one), bigG its trained layer."""
    from sdengine.text.conditioners import effective_clip_skip

    _, pipe = sdxl
    cond = pipe.conditioner
    assert effective_clip_skip(cond, 1, "a1111_sdxl_clip_l") == (0, 1)
    assert effective_clip_skip(cond, 3, "a1111_sdxl_clip_l") == (2, 1)
    assert effective_clip_skip(cond, 3, "a1111") == 1 and effective_clip_skip(cond, 3, "sdengine") == 3
    pair, _ = cond.pair("a red apple", "", clip_skip=(0, 1), width=32, height=32)
    last, _ = cond.pair("a red apple", "", clip_skip=0, width=32, height=32)
    own, _ = cond.pair("a red apple", "", clip_skip=1, width=32, height=32)
    width_l = int(cond.text_encoder.config.hidden_size)
    assert float((pair["crossattn"][..., :width_l] - last["crossattn"][..., :width_l]).abs().max()) == 0.0
    assert float((pair["crossattn"][..., width_l:] - own["crossattn"][..., width_l:]).abs().max()) == 0.0
    plain = pipe("a red apple", width=32, height=32, **FAST)
    two = pipe("a red apple", width=32, height=32, clip_skip=2, clip_skip_rule="a1111_sdxl_clip_l", **FAST)
    np.testing.assert_array_equal(two.arrays, plain.arrays)
    one = pipe("a red apple", width=32, height=32, clip_skip_rule="a1111_sdxl_clip_l", **FAST)
    assert not np.array_equal(one.arrays, plain.arrays)
    assert "Clip skip rule: a1111_sdxl_clip_l" in one.infotexts[0] and "Clip skip:" not in one.infotexts[0]
    back = to_generate_kwargs(parse_parameters(one.infotexts[0]))
    np.testing.assert_array_equal(pipe(**{**back, "progress": False}).arrays, one.arrays)
    for bad in (5, 0):  # said in A1111's numbering, one line, not as the internal (CLIP-L, bigG) pair
        with pytest.raises(GenerationError) as e:
            pipe("a red apple", width=32, height=32, clip_skip=bad, clip_skip_rule="a1111_sdxl_clip_l", **FAST)
        assert str(e.value) == (
            "clip_skip must be an integer in 1..3 for SDXL's CLIP-L under clip_skip_rule a1111_sdxl_clip_l "
            f"(A1111's Clip skip with sdxl_clip_l_skip on), got {bad}"
        )


def a1111_start(pipe, seed: int, init: Image.Image, mask: Image.Image):
    """The pipeline's start latents of a one-row A1111-rule inpainting (the same draws from the row's seed)."""
    import torch

    from sdengine.pipeline.latents import start_latents

    s = pipe.default_size
    return start_latents(
        pipe.vae,
        generators=[torch.Generator("cpu").manual_seed(seed)],
        latent_channels=pipe.latent_channels,
        width=s,
        height=s,
        scale_factor=pipe.vae_scale_factor,
        init=init,
        mask=np.asarray(mask, dtype=np.float32) / 255.0,
        mask_blur=0.0,
        strength=0.75,
        nine_channels=pipe.inpainting,
        tiled=None,
        device=torch.device("cpu"),
        pure_noise_at_full_strength=False,
    )


def unet_inputs(pipe):
    """Hook the U-Net: the list of the latent channels of every call's input."""
    seen: list = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, :4].detach().clone()))
    return seen, handle


def test_a1111_timestep_samplers_blend_the_clean_init_into_the_networks_input(sd1):
    """A1111's DDIM/PLMS/UniPC (mask_before_denoising): every call's input is ``x * nmask + init_latent * mask``,
    the clean init latent in the known region (its k-diffusion samplers blend the x0 prediction instead)."""
    s = sd1.default_size
    init, mask = picture(s, s), half_mask(s)
    start = a1111_start(sd1, FAST["seed"], init, mask)
    keep = start.rounded_mask[0, 0] < 0.5
    assert keep.any() and (~keep).any()
    seen, handle = unet_inputs(sd1)
    try:
        args = {**FAST, "sampler": "ddim", "init_image": init, "mask": mask, "strength": 0.75}
        sd1("a red apple", **args, strength_rule="a1111")
        a1111 = list(seen)
        seen.clear()
        sd1("a red apple", **args)
    finally:
        handle.remove()
    assert len(a1111) == 1  # t_enc = int(0.75 * 3) = 2: one call on A1111's grid (t_enc - 1)
    for x in a1111:
        for row in x:  # cond and uncond rows
            np.testing.assert_allclose(row[:, keep].numpy(), start.init_latent[0][:, keep].numpy(), atol=1e-5)
    # diffusers' blend: the known region on the init's noising path, not the clean latent
    assert float((seen[0][0][:, keep] - start.init_latent[0][:, keep]).abs().max()) > 1e-2


def test_a1111_k_diffusion_blend_keeps_x0_on_the_init_for_inpainting_models_too(tiny_inpaint_folder):
    """A1111 blends each x0 prediction with the init latent for every model (a 9-channel one too, which diffusers
    leaves unblended): with Euler the known region of each step's x0 is the init latent."""
    pipe = load_pipeline(tiny_inpaint_folder, device="cpu")
    s = pipe.default_size
    init, mask = picture(s, s), half_mask(s)
    start = a1111_start(pipe, FAST["seed"], init, mask)
    keep = start.rounded_mask[0, 0] < 0.5
    seen: list = []
    args = {**FAST, "init_image": init, "mask": mask, "strength": 0.75}
    pipe("a red apple", **args, strength_rule="a1111", callback=lambda i: seen.append(i.denoised.clone()))
    assert len(seen) == 3
    for denoised in seen:
        np.testing.assert_allclose(denoised[0][:, keep].numpy(), start.init_latent[0][:, keep].numpy(), atol=1e-6)
    seen.clear()
    pipe("a red apple", **args, callback=lambda i: seen.append(i.denoised.clone()))
    assert float((seen[0][0][:, keep] - start.init_latent[0][:, keep]).abs().max()) > 1e-2


def test_a1111_latent_mask_is_shrunk_bicubic_then_rounded(sd1):
    """A1111's latent mask (``latmask``): the mask made RGB, shrunk by PIL's default ``Image.resize`` filter
    (bicubic) to the latent size, /255 and rounded; sdengine area-averaged it, which rounds other latent pixels
    of a soft or thin mask to the repainted side."""
    import torch

    s = sd1.default_size
    h = w = s // sd1.vae_scale_factor
    yy, xx = np.mgrid[0:s, 0:s]
    # thin stripes (where the two filters round apart) over a grey, and a block repainted wholly
    mask = Image.fromarray(np.where((xx % 4 == 0) | (yy > s * 0.7), 255, 40).astype(np.uint8), "L")
    start = a1111_start(sd1, FAST["seed"], picture(s, s), mask)
    shrunk = np.asarray(mask.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), np.float32)[..., 0]
    want = np.around(shrunk / 255)
    np.testing.assert_array_equal(start.rounded_mask[0, 0].numpy(), want)
    area = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None], (h, w), mode="area"
    )
    assert not np.array_equal((area[0, 0] >= 0.5).float().numpy(), want)  # the old rounding differs here


def test_a1111_img2img_fix_steps_runs_the_steps_asked(sd1):
    """A1111's img2img_fix_steps ("With img2img, do exactly the amount of steps the slider specifies"; strength_rule
    "a1111_fix_steps"): a schedule of int(steps / min(strength, 0.999)) steps of which img2img runs ``steps`` (its
    timestep samplers ``steps - 1``), as its hires second pass; recorded in the infotext, read back the same."""
    from sdengine.diffusion.schedules import img2img_steps

    assert img2img_steps(20, 0.5, "a1111_fix_steps", "euler") == (40, 20)
    assert img2img_steps(20, 0.3, "a1111_fix_steps", "ddim") == (66, 47)
    assert img2img_steps(20, 0.5, "a1111", "euler") == (20, 9)
    s = sd1.default_size
    seen: list = []
    args = {**FAST, "init_image": picture(s, s), "strength": 0.5, "steps": 4}
    fixed = sd1("a red apple", **args, strength_rule="a1111_fix_steps", callback=lambda i: seen.append(i))
    assert [i.step for i in seen] == [1, 2, 3, 4] and seen[-1].steps == 4  # int(0.5 * 4) + 1 = 3 without it
    plain = sd1("a red apple", **args, strength_rule="a1111")
    assert not np.array_equal(fixed.arrays, plain.arrays)
    text = fixed.infotexts[0]
    assert "Strength rule: a1111_fix_steps" in text
    back = to_generate_kwargs(parse_parameters(text))
    assert back["strength_rule"] == "a1111_fix_steps"
    np.testing.assert_array_equal(sd1(**{**back, "init_image": picture(s, s), "progress": False}).arrays, fixed.arrays)
    # the first sigma is the one of step total - steps of the longer (8-step) schedule
    assert seen[0].sigma == pytest.approx(float(sd1_grid_sigma(sd1, 8, 4)), rel=1e-6)
    with pytest.raises(GenerationError, match=r"strength must be in \(0, 1\], got 0.0"):
        sd1("a red apple", **{**args, "strength": 0.0}, strength_rule="a1111_fix_steps")


def sd1_grid_sigma(pipe, steps: int, index: int):
    from sdengine.diffusion import sampling

    grid = sampling.make_grid(FAST["sampler"], steps, pipe.noise_schedule, FAST["schedule"], pipe.scheduler_config)
    return grid.sigmas[index]


def test_a1111_noise_multiplier_scales_the_img2img_noise(sd1):
    """A1111's img2img "Noise multiplier" (initial_noise_multiplier): the init latent is noised with the noise
    times it, ``init + m * sigma * noise`` (it was listed as ignored)."""
    import math

    from sdengine.diffusion import sampling

    s = sd1.default_size
    init = picture(s, s)
    start = a1111_start(sd1, FAST["seed"], init, Image.new("L", (s, s), 0))  # the same draws as img2img's
    grid = sampling.make_grid("euler", 3, sd1.noise_schedule, "normal", sd1.scheduler_config, 1.0)
    s0 = float(grid.sigmas[img2img_start(3, 0.5, "a1111", "euler")])
    seen, handle = unet_inputs(sd1)
    try:
        got = sd1("a red apple", **FAST, init_image=init, strength=0.5, strength_rule="a1111", noise_multiplier=0.5)
    finally:
        handle.remove()
    want = (start.init_latent + 0.5 * s0 * start.noise) / math.sqrt(1 + s0 * s0)
    np.testing.assert_allclose(seen[0][0].numpy(), want[0].numpy(), rtol=0, atol=1e-5)
    assert parse_parameters(got.infotexts[0])["Noise multiplier"] == "0.5"
    back = to_generate_kwargs(parse_parameters(got.infotexts[0]))
    assert back["noise_multiplier"] == 0.5
    plain = sd1("a red apple", **FAST, init_image=init, strength=0.5, strength_rule="a1111")
    assert "Noise multiplier" not in plain.infotexts[0] and not np.array_equal(plain.arrays, got.arrays)
    with pytest.raises(GenerationError, match="noise_multiplier 0.5 scales the noise added to an init image"):
        sd1("a", **FAST, enable_hr=True, noise_multiplier=0.5)


# ------------------------------------------------------------------------- discard next-to-last sigma


def _timesteps_seen(pipe):
    seen: list[float] = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1].reshape(-1)[0])))
    return seen, handle


def test_pipeline_discards_under_a1111s_rules_and_when_asked(sd1):
    """The pipeline: DPM2 under strength_rule "a1111" (the A1111 routes) walks the discarded grid (the network sees
    its timesteps), under diffusers' rule the plain one; ``discard_penultimate_sigma`` (A1111's
    always_discard_next_to_last_sigma) does it for Euler, written "Discard penultimate sigma: True" and read back."""
    pipe = sd1
    ns, cfg = pipe.noise_schedule, pipe.scheduler_config
    kw = dict(steps=3, cfg_scale=3.0, seed=5, progress=False)
    seen, handle = _timesteps_seen(pipe)
    try:
        a1111 = pipe("a star", sampler="dpm2", schedule="karras", strength_rule="a1111", **kw)
        dpm2_calls = list(seen)
        seen.clear()
        plain = pipe("a star", sampler="dpm2", schedule="karras", **kw)
        plain_calls = list(seen)
        seen.clear()
        euler = pipe("a star", sampler="euler", schedule="karras", discard_penultimate_sigma=True, **kw)
        euler_calls = list(seen)
    finally:
        handle.remove()
    want = sampling.make_grid("dpm2", 3, ns, "karras", cfg, discard_penultimate=True).timesteps.tolist()
    assert dpm2_calls[0::2] == want  # DPM2: a grid call, then a midpoint's (none on the last step, to 0)
    assert plain_calls[0::2] == sampling.make_grid("dpm2", 3, ns, "karras", cfg).timesteps.tolist() != want
    assert not np.array_equal(a1111.arrays, plain.arrays)
    assert euler_calls == sampling.make_grid("euler", 3, ns, "karras", cfg, discard_penultimate=True).timesteps.tolist()
    text = euler.infotexts[0]
    assert "Discard penultimate sigma: True" in text and "Discard penultimate sigma" not in a1111.infotexts[0]
    back = to_generate_kwargs(parse_parameters(text))
    assert back["discard_penultimate_sigma"] is True
    np.testing.assert_array_equal(pipe(**{**back, "progress": False}).arrays, euler.arrays)
    # sdengine's DPM2 image under A1111's rules says so, and comes back from its infotext
    back = to_generate_kwargs(parse_parameters(a1111.infotexts[0]))
    np.testing.assert_array_equal(pipe(**{**back, "progress": False}).arrays, a1111.arrays)
    # an A1111 infotext with DPM2 is read with A1111's rule (it discarded)
    theirs = f"a star\nSteps: 3, Sampler: DPM2, Schedule type: Karras, CFG scale: 3, Seed: 5, {A1111_VERSION}"
    assert to_generate_kwargs(parse_parameters(theirs))["strength_rule"] == "a1111"
    with pytest.raises(Exception, match="discard_penultimate_sigma must be true or false"):
        pipe("a star", sampler="euler", discard_penultimate_sigma="yes", **kw)


def test_comfyui_ksampler_discards_for_dpm_2_and_not_for_euler(sd1):
    """ComfyUI's KSampler with dpm_2 walks the discarded grid (its DISCARD_PENULTIMATE_SIGMA_SAMPLERS), with euler
    the plain one (once both the plain one)."""
    from sdengine.latent_sampling import encode_text
    from sdengine.server.comfy.nodes import ModelHandle, RunContext, ksampler

    pipe = sd1
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    pos, neg = [encode_text(pipe, "a star")], [encode_text(pipe, "")]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    kw = dict(model=ModelHandle("tiny"), seed=3, steps=3, cfg=3.0, scheduler="karras", positive=pos, negative=neg)
    seen, handle = _timesteps_seen(pipe)
    try:
        with torch.inference_mode():
            ksampler(ctx, sampler_name="dpm_2", latent_image=latent, **kw)
            dpm2 = list(seen)
            seen.clear()
            ksampler(ctx, sampler_name="euler", latent_image=latent, **kw)
            euler = list(seen)
    finally:
        handle.remove()
    ns, cfg = pipe.noise_schedule, pipe.scheduler_config
    comfy = dict(comfy_grid=True)  # ComfyUI's karras list (the model's sigma_min .. sigma_max), KSampler's grid
    want = sampling.make_grid("dpm2", 3, ns, "karras", cfg, discard_penultimate=True, **comfy).timesteps.tolist()
    assert dpm2[0::2] == want != sampling.make_grid("dpm2", 3, ns, "karras", cfg, **comfy).timesteps.tolist()
    grid = sampling.make_grid("euler", 3, ns, "karras", cfg, **comfy)
    # ComfyUI's ModelSamplingDiscrete.timestep: the nearest table timestep of each sigma (not the fractional one)
    nearest = (grid.sigmas[:-1].log()[None] - ns.log_sigmas[:, None]).abs().argmin(dim=0).float().tolist()
    assert euler == nearest != grid.timesteps.tolist()


# ------------------------------------------------------------------------- Brownian-tree noise


def _recording(monkeypatch):
    """The (sigma, sigma_next) of every Brownian noise read, and the specs of the trees made."""
    from sdengine.diffusion import brownian

    reads: list[tuple[float, float]] = []
    made: list[tuple[tuple[int, ...], float, float, tuple[int, ...]]] = []
    between, init = brownian.BrownianNoise.between, brownian.BrownianNoise.__init__

    def spy_between(self, sigma, sigma_next):
        reads.append((float(sigma), float(sigma_next)))
        return between(self, sigma, sigma_next)

    def spy_init(self, sigma_min, sigma_max, shape, seeds):
        made.append((tuple(seeds), float(sigma_min), float(sigma_max), tuple(shape)))
        init(self, sigma_min, sigma_max, shape, seeds)

    monkeypatch.setattr(brownian.BrownianNoise, "between", spy_between)
    monkeypatch.setattr(brownian.BrownianNoise, "__init__", spy_init)
    return reads, made


def test_a1111_sde_samplers_draw_brownian_tree_noise(sd1, monkeypatch):
    """Under A1111's rules DPM++ 2M SDE draws its step noise from one Brownian tree per image, seeded by the image's
    seed, over the whole grid's sigmas (A1111's create_noise_sampler), read at each step's two sigmas; DPM++ SDE
    reads its midpoint as k-diffusion computes it; the native rule keeps the rows' generators (once A1111's rule did
    too: another image than A1111's for the same seed)."""
    pipe = sd1
    reads, made = _recording(monkeypatch)
    kw = dict(steps=4, sampler="dpmpp_2m_sde", schedule="karras", cfg_scale=5.0, seed=11, progress=False)
    kw.update(width=32, height=32)
    a1111 = pipe("a red apple", strength_rule="a1111", batch_size=2, **kw)
    grid = sampling.make_grid("dpmpp_2m_sde", 4, pipe.noise_schedule, "karras", pipe.scheduler_config)
    s = grid.sigmas.tolist()
    assert made == [((11, 12), s[-2], s[0], (2, 4, 16, 16))]  # one tree per image (32 px: a 16 x 16 latent here)
    assert reads == [(s[i], s[i + 1]) for i in range(3)]  # the last step (to 0) draws nothing
    reads.clear(), made.clear()
    plain = pipe("a red apple", batch_size=2, **kw)
    assert reads == [] and made == [] and not np.array_equal(a1111.arrays, plain.arrays)
    # a row is its seed's image whatever the batch (a tree per image; up to the network's batched rounding)
    alone = pipe("a red apple", strength_rule="a1111", **{**kw, "seed": 12})
    np.testing.assert_allclose(alone.arrays[0], a1111.arrays[1], atol=1e-5)
    # the infotext says A1111's rule, so the image comes back from it; an A1111 infotext is read so too
    assert "Strength rule: a1111" in alone.infotexts[0]
    back = to_generate_kwargs(parse_parameters(alone.infotexts[0]))
    np.testing.assert_array_equal(pipe(**{**back, "progress": False}).arrays, alone.arrays)
    theirs = f"a red apple\nSteps: 4, Sampler: DPM++ 2M SDE, CFG scale: 5, Seed: 11, {A1111_VERSION}"
    assert to_generate_kwargs(parse_parameters(theirs))["strength_rule"] == "a1111"
    reads.clear()
    from sdengine.diffusion.samplers import float32_midpoint

    pipe("a red apple", strength_rule="a1111", **{**kw, "sampler": "dpmpp_sde"})
    s = sampling.make_grid("dpmpp_sde", 4, pipe.noise_schedule, "karras", pipe.scheduler_config).sigmas.tolist()
    want = []
    for i in range(3):
        want += [(s[i], float32_midpoint(s[i], s[i + 1])), (s[i], s[i + 1])]
    assert reads == want


def test_comfyui_sde_samplers_draw_one_brownian_tree_for_the_batch(sd1, monkeypatch):
    """ComfyUI's KSampler with dpmpp_2m_sde: one tree of the batch's shape seeded by the seed, over the sigmas its
    sampler is handed (the last `steps` of the longer grid at denoise < 1); sdengine's seed rule keeps the rows'
    generators."""
    from sdengine.latent_sampling import encode_text
    from sdengine.server.comfy.nodes import ModelHandle, RunContext, ksampler

    pipe = sd1
    reads, made = _recording(monkeypatch)
    pos, neg = [encode_text(pipe, "a star")], [encode_text(pipe, "")]
    kw = dict(model=ModelHandle("tiny"), seed=3, steps=3, cfg=3.0, scheduler="karras", positive=pos, negative=neg)
    latent = {"samples": torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        ksampler(RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None), sampler_name="dpmpp_2m_sde",
                 latent_image=latent, denoise=0.5, **kw)  # fmt: skip
        grid = sampling.make_grid("dpmpp_2m_sde", 6, pipe.noise_schedule, "karras", pipe.scheduler_config)
        s = grid.sigmas.tolist()
        assert made == [((3,), s[-2], s[3], (2, 4, 4, 4))]
        assert reads == [(s[i], s[i + 1]) for i in (3, 4)]
        reads.clear(), made.clear()
        ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None, seed_rule="sdengine")
        ksampler(ctx, sampler_name="dpmpp_2m_sde", latent_image=latent, denoise=0.5, **kw)
        assert reads == [] and made == []
