"""The img2img strength rule: diffusers' (the default: ``int(steps * strength)`` steps) or AUTOMATIC1111's
(``int(min(strength, 0.999) * steps) + 1`` steps, its hires pass all N steps of a longer schedule), for the
pipeline, its infotext ("Strength rule") and ``--from-png``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from _pipeline_models import picture
from sdengine.diffusion.schedules import STRENGTH_RULES, hires_steps, img2img_start
from sdengine.errors import UsageError
from sdengine.metadata import MetadataError, parse_parameters, save_png, to_generate_kwargs
from sdengine.pipeline import GenerationError, Pipeline, load_pipeline

BASE = {"prompt": "a red apple", "steps": 4, "sampler": "euler", "cfg_scale": 6.0, "seed": 5, "progress": False}


def a1111_steps(steps: int, strength: float) -> tuple[int, int]:
    """A1111's modules/sd_samplers_kdiffusion.py sample_img2img, written out: (first index, steps run)."""
    t_enc = int(min(strength, 0.999) * steps)
    return steps - t_enc - 1, t_enc + 1


@pytest.mark.parametrize(
    "steps,strength",
    [(20, 0.75), (20, 0.0), (20, 0.999), (20, 1.0), (20, 0.01), (3, 0.5), (4, 0.3), (7, 0.29), (1, 0.0), (1, 1.0)],
)
def test_a1111_rule_counts_steps_as_a1111(steps, strength):
    first, run = a1111_steps(steps, strength)
    assert img2img_start(steps, strength, "a1111") == first
    assert steps - img2img_start(steps, strength, "a1111") == run


def test_the_two_rules_at_the_edges():
    # 20 steps at 0.75: 15 with diffusers' rule, 16 with A1111's
    assert 20 - img2img_start(20, 0.75) == 15 and 20 - img2img_start(20, 0.75, "a1111") == 16
    # strength 0: A1111 runs one step (the schedule's last); diffusers' rule refuses it
    assert img2img_start(20, 0.0, "a1111") == 19
    with pytest.raises(UsageError, match=r"strength must be in \(0, 1\]"):
        img2img_start(20, 0.0)
    # 0.999 and 1: every step with both rules (A1111 caps the strength at 0.999)
    assert img2img_start(20, 0.999, "a1111") == img2img_start(20, 1.0, "a1111") == 0
    assert img2img_start(20, 1.0) == 0 and img2img_start(20, 0.999) == 1
    with pytest.raises(UsageError, match=r"strength must be in \[0, 1\]"):
        img2img_start(20, 1.5, "a1111")
    with pytest.raises(UsageError, match="unknown strength rule 'comfy'; use one of: diffusers, a1111"):
        img2img_start(20, 0.5, "comfy")
    assert STRENGTH_RULES == ("diffusers", "a1111", "a1111_fix_steps")


def test_hires_steps_follow_a1111s_fixed_steps_branch():
    # A1111's setup_img2img_steps(p, steps=N): a schedule of int(N / min(strength, 0.999)) steps, the last N run
    for n, strength in [(20, 0.75), (20, 0.5), (4, 0.6), (5, 0.3), (20, 1.0), (20, 0.999), (10, 0.01)]:
        total = int(n / min(strength, 0.999))
        assert hires_steps(n, strength, "a1111") == (total, total - n)
    assert hires_steps(20, 0.75, "a1111") == (26, 6)
    assert hires_steps(20, 0.75) == (20, img2img_start(20, 0.75)) == (20, 5)  # diffusers': an img2img of N steps
    with pytest.raises(UsageError, match=r"hires strength must be in \(0, 1\]"):
        hires_steps(20, 0.0, "a1111")


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder) -> Pipeline:
    p = load_pipeline(tiny_sd1_folder, device="cpu")
    assert isinstance(p, Pipeline)
    return p


def run(pipe: Pipeline, **kw):
    seen: list[tuple[int, int]] = []
    out = pipe(**{**BASE, **kw}, callback=lambda info: seen.append((info.step, info.steps)))
    return out, seen[-1]


@pytest.mark.parametrize(
    "strength,same_start",
    [(0.5, 0.75), (0.0, 0.25), (0.3, 0.5), (0.999, 1.0), (1.0, 1.0)],  # 4 steps: A1111's start = diffusers' start
)
def test_a1111_rule_image_is_the_diffusers_image_with_the_same_start(pipe, strength, same_start):
    init = picture(pipe.default_size, pipe.default_size)
    got, (step, steps) = run(pipe, init_image=init, strength=strength, strength_rule="a1111")
    want, _ = run(pipe, init_image=init, strength=same_start)
    assert img2img_start(4, strength, "a1111") == img2img_start(4, same_start)
    np.testing.assert_array_equal(got.arrays, want.arrays)
    assert step == steps == a1111_steps(4, strength)[1]
    fields = parse_parameters(got.infotexts[0])
    assert fields["Denoising strength"] == f"{strength:g}" and fields["Strength rule"] == "a1111"
    assert "Strength rule" not in parse_parameters(want.infotexts[0])  # the default rule is not written


def test_a1111_rule_differs_from_diffusers_at_the_same_strength(pipe):
    init = picture(pipe.default_size, pipe.default_size)
    a, (_, a_steps) = run(pipe, init_image=init, strength=0.5, strength_rule="a1111")
    d, (_, d_steps) = run(pipe, init_image=init, strength=0.5)
    assert (a_steps, d_steps) == (3, 2)
    assert not np.array_equal(a.arrays, d.arrays)


def test_a1111_rule_inpainting(pipe):
    s = pipe.default_size
    mask = Image.new("L", (s, s), 0)
    mask.paste(255, (0, 0, s // 2, s))
    got, (_, steps) = run(pipe, init_image=picture(s, s), mask=mask, strength=0.5, strength_rule="a1111")
    want, _ = run(pipe, init_image=picture(s, s), mask=mask, strength=0.75)
    assert steps == 3
    # A1111 blends each x0 prediction with the init latent (tests/test_a1111_fidelity.py), diffusers the noisy x
    # with the noised init: with Euler and a hard mask both keep the known region on init + sigma * noise
    np.testing.assert_allclose(got.arrays, want.arrays, rtol=0, atol=1e-5)


def test_strength_rule_errors_are_one_line(pipe):
    init = picture(pipe.default_size, pipe.default_size)
    with pytest.raises(GenerationError, match="unknown strength_rule 'comfy'; use one of: diffusers, a1111"):
        pipe(**BASE, init_image=init, strength_rule="comfy")
    with pytest.raises(GenerationError, match=r"strength must be in \(0, 1\], got 0"):
        pipe(**BASE, init_image=init, strength=0.0)  # diffusers' rule: no step
    with pytest.raises(GenerationError, match=r"strength must be in \[0, 1\], got -0.1"):
        pipe(**BASE, init_image=init, strength=-0.1, strength_rule="a1111")
    with pytest.raises(GenerationError, match=r"hires strength must be in \(0, 1\], got 0"):
        pipe(**BASE, enable_hr=True, strength=0.0, strength_rule="a1111")  # A1111's hires pass: no step
    # a schedule of int(N / strength) steps over the model's 1000 timesteps
    with pytest.raises(GenerationError, match="needs a schedule of 1600 steps"):
        pipe(**BASE, enable_hr=True, hr_second_pass_steps=16, strength=0.01, strength_rule="a1111")


def test_txt2img_ignores_the_rule_and_writes_no_field(pipe):
    a, _ = run(pipe, strength_rule="a1111")
    b, _ = run(pipe)
    np.testing.assert_array_equal(a.arrays, b.arrays)
    assert a.infotexts == b.infotexts and "Strength rule" not in a.infotexts[0]


def test_from_png_reads_the_strength_rule_back(pipe, tiny_sd1_folder, tmp_path, caplog):
    from sdengine.cli import main

    init = tmp_path / "init.png"
    picture(pipe.default_size, pipe.default_size).save(init)
    out = pipe(**BASE, init_image=Image.open(init), strength=0.5, strength_rule="a1111")
    png = save_png(out.images[0], tmp_path / "a.png", out.infotexts[0])
    assert "Strength rule: a1111" in out.infotexts[0]
    with caplog.at_level(logging.WARNING, logger="sdengine.metadata"):
        kw = to_generate_kwargs(parse_parameters(out.infotexts[0]))
    assert kw["strength_rule"] == "a1111" and kw["strength"] == 0.5
    assert caplog.records == [], [r.getMessage() for r in caplog.records]  # a used field: no "not reproduced"
    again = tmp_path / "b.png"
    args = ["generate", "--from-png", str(png), "--model", str(tiny_sd1_folder), "--init-image", str(init)]
    assert main([*args, "--out", str(again), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(out.images[0]))
    assert Image.open(again).info["parameters"] == out.infotexts[0]
    # the same image from the flag
    flag = tmp_path / "c.png"
    cmd = ["generate", BASE["prompt"], "--model", str(tiny_sd1_folder), "--init-image", str(init), "--strength", "0.5"]
    cmd += ["--steps", "4", "--sampler", "euler", "--cfg", "6", "--seed", "5", "--strength-rule", "a1111"]
    assert main([*cmd, "--out", str(flag), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(flag)), np.asarray(out.images[0]))
    with pytest.raises(MetadataError, match="Strength rule: 'comfy' is not one of diffusers, a1111"):
        to_generate_kwargs(parse_parameters(out.infotexts[0].replace("Strength rule: a1111", "Strength rule: comfy")))
