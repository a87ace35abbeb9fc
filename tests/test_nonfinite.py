"""Values that go NaN/inf never become a PNG: bounded inputs are refused up front (cfg, prompt weights, seeds),
and the pipeline checks the latents and the decoded image before anything is written (NonFiniteError).
Plus the API's type checks on seeds and prompts (no silent coercion) and ``--from-png`` on an empty text."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import sdengine
from sdengine.cli import main
from sdengine.diffusion import sampling
from sdengine.errors import GenerationError, NonFiniteError, SdengineError
from sdengine.pipeline.request import MAX_CFG_SCALE, MAX_SEED, GenerationRequest
from sdengine.prompts import MAX_PROMPT_WEIGHT, PromptError, parse_prompt_attention

FAST = {"steps": 2, "width": 32, "height": 32, "progress": False, "seed": 3}
HUGE_DIGITS = "1" + "0" * 39  # 1e39 written out: A1111's weight pattern takes digits and dots only


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu")


# -- bounds checked before any work -------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [1e308, math.inf, math.nan, MAX_CFG_SCALE + 1, -1.0])
def test_cfg_scale_outside_its_bounds_is_refused(cfg):
    with pytest.raises(GenerationError, match="cfg_scale"):
        GenerationRequest(prompt="x", cfg_scale=cfg).validate()


def test_cfg_scale_at_the_bound_is_accepted():
    GenerationRequest(prompt="x", cfg_scale=MAX_CFG_SCALE).validate()


@pytest.mark.parametrize(
    "prompt, match",
    [
        (f"(heart:{HUGE_DIGITS})", "outside"),
        ("(heart:101)", "outside"),
        ("(heart:-101)", "outside"),
        ("((((heart:100):100):100))", "combined weight"),
    ],
)
def test_prompt_weights_outside_the_bounds_are_a_prompt_error(prompt, match):
    with pytest.raises(PromptError, match=match):
        parse_prompt_attention(prompt)


def test_prompt_weights_inside_the_bounds_are_kept():
    assert parse_prompt_attention(f"(heart:{MAX_PROMPT_WEIGHT:g})") == [("heart", MAX_PROMPT_WEIGHT)]
    assert parse_prompt_attention("(heart:-2)") == [("heart", -2.0)]
    # A1111's grammar: an exponent is not a weight, so "(heart:1e39)" is the text "heart:1e39" at 1.1
    assert parse_prompt_attention("(heart:1e39)") == [("heart:1e39", 1.1)]


@pytest.mark.parametrize("seed", [1.5, True, np.float64(2.0), "7", MAX_SEED + 1, 2**70, -2])
def test_seed_that_is_not_an_integer_in_range_is_refused(seed):
    with pytest.raises(GenerationError, match="seed"):
        GenerationRequest(prompt="x", seed=seed).validate()


def test_seed_range_counts_the_last_row():
    GenerationRequest(prompt="x", seed=MAX_SEED).validate()
    GenerationRequest(prompt="x", seed=np.int64(5)).validate()
    with pytest.raises(GenerationError, match="2\\*\\*64 - 1"):
        GenerationRequest(prompt="x", seed=MAX_SEED, batch_size=2).validate()
    with pytest.raises(GenerationError, match="seeds in a list"):
        GenerationRequest(prompt=["a", "b"], seed=[1, MAX_SEED + 1]).validate()
    with pytest.raises(GenerationError, match="subseed"):
        GenerationRequest(prompt="x", subseed=MAX_SEED + 1, subseed_strength=0.5).validate()


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("value", [b"red heart", ["a", b"b"], [["a"]], 5, ["a", None, 3]])
def test_prompt_of_the_wrong_type_names_the_field(field, value):
    with pytest.raises(GenerationError, match=f"^{field} must be a string"):
        GenerationRequest(**{field: value}).validate()


def test_a_list_of_prompts_is_still_a_batch():
    r = GenerationRequest(prompt=["a", "b"], negative_prompt=["c", "d"], seed=[1, 2]).validate()
    assert r.prompts() == ["a", "b"] and r.n_rows == 2


def test_api_call_refuses_a_float_seed_before_running(pipe, monkeypatch):
    monkeypatch.setattr(sampling, "sample", _must_not_run)
    with pytest.raises(GenerationError, match="seed must be an integer"):
        pipe("x", **{**FAST, "seed": 1.5})


def _must_not_run(*args, **kwargs):
    raise AssertionError("sampling ran for a request that should have been refused")


# -- non-finite values inside the pipeline --------------------------------------------------------------


def test_nan_from_the_unet_is_refused_before_decoding(pipe):
    decoded = []
    h_unet = pipe.unet.conv_out.register_forward_hook(lambda m, i, o: o * float("nan"))
    h_vae = pipe.vae.decoder.register_forward_hook(lambda m, i, o: decoded.append(1))
    try:
        with pytest.raises(NonFiniteError, match="latents after sampling") as e:
            pipe("red heart", **FAST)
    finally:
        h_unet.remove()
        h_vae.remove()
    assert "\n" not in str(e.value) and isinstance(e.value, SdengineError)
    assert decoded == []  # refused before the VAE turned NaN into a black image
    assert pipe("red heart", **FAST).arrays.std() > 0  # the pipeline is unharmed


def test_inf_from_the_vae_is_refused(pipe):
    h = pipe.vae.decoder.register_forward_hook(lambda m, i, o: o + float("inf"))
    try:
        with pytest.raises(NonFiniteError, match="decoded image"):
            pipe("red heart", **FAST)
    finally:
        h.remove()


def test_half_precision_vae_fall_back_still_works(pipe):
    """NaN from an fp16 decode is redone in float32 (before the check): an image, not an error."""
    vae = pipe.vae
    calls = []

    def nan_in_half(m, i, o):
        calls.append(o.dtype)
        return o * float("nan") if o.dtype == torch.float16 else o

    vae.half()
    h = vae.decoder.register_forward_hook(nan_in_half)
    try:
        pipe.vae_upcast = False
        result = pipe("red heart", **FAST)
    finally:
        h.remove()
        vae.float()
        pipe.vae_upcast = False
    assert calls[:2] == [torch.float16, torch.float32]
    assert np.isfinite(result.arrays).all() and any("float32" in n for n in result.notes)


# -- the CLI: one line, exit 2, no PNG ---------------------------------------------------------------


def _cli(model, out, *args):
    # the fixed options first: a later --seed in args wins (argparse keeps the last)
    return main(["generate", "--model", str(model), "--steps", "2", "--width", "32", "--height", "32",
                 "--seed", "3", "--no-progress", "--out", str(out), *args])  # fmt: skip


def test_cli_non_finite_latents_write_no_png(tiny_sd1_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sampling, "sample", lambda den, noise, **kw: torch.full_like(noise, float("nan")))
    out = tmp_path / "out"
    assert _cli(tiny_sd1_folder, out, "red heart") == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite" in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())


def _png_with(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize(
    "args, match",
    [
        (["heart", "--cfg", "1e308"], "cfg_scale"),
        ([f"(heart:{HUGE_DIGITS})"], "prompt weight"),
        (["heart", "--negative", f"(blur:{HUGE_DIGITS})"], "prompt weight"),
        (["heart", "--seed", str(2**64)], "seed 18446744073709551616 is out of range"),
        ([f"heart <lora:x:{HUGE_DIGITS}>"], "weight"),
    ],
)
def test_cli_refuses_absurd_values_before_loading_the_model(tiny_sd1_folder, tmp_path, monkeypatch, capsys, args,
                                                            match):  # fmt: skip
    monkeypatch.setattr("sdengine.pipeline.load_pipeline", _must_not_run)
    out = tmp_path / "out"
    assert _cli(tiny_sd1_folder, out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "text, match",
    [
        (f"(heart:{HUGE_DIGITS})\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32", "prompt weight"),
        ("heart\nNegative prompt: (x:500)\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32", "weight"),
        ("heart\nSteps: 2, Sampler: Euler, CFG scale: 1e308, Seed: 1, Size: 32x32", "cfg_scale"),
        ("", "empty 'parameters' text"),
        ("  \n ", "empty 'parameters' text"),
    ],
)
def test_from_png_with_absurd_or_empty_parameters_is_refused(tiny_sd1_folder, tmp_path, monkeypatch, capsys, text,
                                                             match):  # fmt: skip
    monkeypatch.setattr("sdengine.pipeline.load_pipeline", _must_not_run)
    png = _png_with(tmp_path / "in.png", text)
    out = tmp_path / "out"
    assert main(["generate", "--from-png", str(png), "--model", str(tiny_sd1_folder), "--no-progress",
                 "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
    assert not out.exists()


# -- careless input found by tools/hostile_sweep.py -------------------------------------------------------


@pytest.mark.parametrize("blur", [math.inf, math.nan, 1e9, -1.0])
def test_mask_blur_outside_its_bounds_is_refused(blur):
    with pytest.raises(GenerationError, match="mask_blur must be in \\[0, 256\\]"):
        GenerationRequest(prompt="x", mask_blur=blur).validate()
    GenerationRequest(prompt="x", mask_blur=64).validate()


def test_invalid_utf8_in_a_prompt_is_a_named_error(tiny_sd1_folder, tmp_path, monkeypatch, capsys):
    # how Python hands a byte that is not UTF-8 in argv to the program: a lone surrogate (was a TypeError)
    with pytest.raises(GenerationError, match="negative_prompt holds a character that is not valid text"):
        GenerationRequest(prompt="ok", negative_prompt="red \udcff heart").validate()
    monkeypatch.setattr("sdengine.pipeline.load_pipeline", _must_not_run)
    assert _cli(tiny_sd1_folder, tmp_path / "o", "red \udcff heart") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt holds a character that is not valid text" in err[0]


def test_unknown_sampler_option_is_named(pipe):
    with pytest.raises(SdengineError, match="sampler 'euler_a' has no option nope; its options: eta"):
        pipe("x", **{**FAST, "sampler": "euler_a", "sampler_options": {"nope": 1}})
    assert pipe("x", **{**FAST, "sampler": "euler_a", "sampler_options": {"eta": 0.5}}).arrays.std() > 0


def test_pixel_ddpm_non_finite_sample_is_refused(monkeypatch):
    """The pixel DDPM (fashion-mnist) checks its samples too: NaN becomes a NonFiniteError, not a black PNG."""
    fm = sdengine.load_pipeline("fashion-mnist", device="cpu")
    monkeypatch.setattr(fm.model, "generate", lambda *a, **k: torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(NonFiniteError, match="sampled image"):
        fm("Sneaker", steps=2, seed=1, progress=False)
