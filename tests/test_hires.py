"""The hires fix (sdengine.pipeline.hires): its second pass IS an img2img of the upscaled first pass with the
seed rule the module documents (a fresh generator of the row's seed), for a latent and a pixel upscaler; the
sizes follow A1111's rule; the infotext fields are A1111's and read back; bad settings are one-line errors.
Runs on the tiny random SD 1.x folder (CLIP text encoder)."""

from __future__ import annotations

import io
import logging

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webuiapi
from PIL import Image

from _emoji_models import make_tiny_emoji_folder
from _live_server import live_server, server_config, wait_job
from sdengine import vae_utils
from sdengine.diffusion import sampling
from sdengine.diffusion.denoisers import Denoiser
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.diffusion.samplers import row_noise
from sdengine.diffusion.schedules import img2img_start
from sdengine.metadata import MetadataError, parse_parameters, to_generate_kwargs
from sdengine.pipeline import GenerationError, GenerationRequest, Pipeline, load_pipeline
from sdengine.pipeline.hires import LATENT_UPSCALERS, UPSCALERS
from sdengine.pipeline.unet_adapter import UNetAdapter

BASE = {
    "prompt": "a red apple",
    "negative_prompt": "blurry",
    "steps": 4,
    "sampler": "euler",
    "schedule": "normal",
    "cfg_scale": 6.0,
    "seed": 11,
    "progress": False,
}


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder) -> Pipeline:
    p = load_pipeline(tiny_sd1_folder, device="cpu")
    assert isinstance(p, Pipeline)
    return p


def size(pipe: Pipeline) -> int:
    return pipe.default_size


def explicit_img2img(
    pipe: Pipeline,
    init_latent: torch.Tensor,
    *,
    seed: int,
    steps: int,
    strength: float,
    sampler: str,
    prompt: str,
    negative: str,
    start: int | None = None,
) -> np.ndarray:
    """An img2img run from a latent, written out from the public pieces: the noise from a fresh generator of
    ``seed``, the sampler started at ``strength`` (or at step ``start`` of ``steps``), the VAE decode. (H, W, 3)
    floats in [0, 1]."""
    cond, uncond = pipe.conditioner.pair(prompt, negative)
    den = Denoiser(UNetAdapter(pipe.unet, pipe.dtype), pipe.noise_schedule, pipe.prediction_type)
    den = CFGDenoiser(den, BASE["cfg_scale"], uncond)
    g = torch.Generator("cpu").manual_seed(seed)
    noise = row_noise([g], tuple(init_latent.shape[1:]))
    with torch.inference_mode():
        x = sampling.sample(
            den,
            noise,
            sampler=sampler,
            steps=steps,
            schedule="normal",
            scheduler_config=pipe.scheduler_config,
            generators=[g],
            extra_args=cond,
            init_latent=init_latent,
            strength=strength,
            start_step=img2img_start(steps, strength) if start is None else start,
            noise_schedule=pipe.noise_schedule,
        )
        img, _ = vae_utils.decode(pipe.vae, x, warn=False)
    return vae_utils.to_unit(img)[0].permute(1, 2, 0).float().numpy()


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)"])
def test_latent_second_pass_is_img2img_of_the_upscaled_latent(pipe, upscaler):
    s = size(pipe)
    out = pipe(**BASE, enable_hr=True, hr_scale=2, hr_upscaler=upscaler, strength=0.6, hr_second_pass_steps=5)
    assert out.images[0].size == (2 * s, 2 * s)
    # the first pass: the same request without the hires fix, stopped before the VAE
    with torch.inference_mode():
        first = pipe.sample_latents(pipe.prepare(GenerationRequest(**BASE)))
    mode, antialias = LATENT_UPSCALERS[upscaler]
    f = pipe.vae_scale_factor
    up = F.interpolate(first, size=(2 * s // f, 2 * s // f), mode=mode, antialias=antialias)
    want = explicit_img2img(
        pipe, up, seed=11, steps=5, strength=0.6, sampler="euler", prompt="a red apple", negative="blurry"
    )
    assert want.std() > 0.02  # a picture, not a constant
    np.testing.assert_allclose(out.arrays[0], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n,strength", [(5, 0.6), (0, 0.5)])
def test_a1111_rule_second_pass_runs_the_last_n_steps_of_a_longer_schedule(pipe, n, strength):
    """A1111's second pass (its sampler given N = hr_second_pass_steps or steps): a schedule of
    int(N / min(strength, 0.999)) steps, of which the last N run; the infotext records the strength as asked."""
    s = size(pipe)
    seen = []
    out = pipe(
        **BASE,
        enable_hr=True,
        hr_scale=2,
        strength=strength,
        hr_second_pass_steps=n,
        strength_rule="a1111",
        callback=lambda info: seen.append((info.step, info.steps)),
    )
    n = n or BASE["steps"]
    total = int(n / min(strength, 0.999))
    assert seen[-1] == (BASE["steps"] + n,) * 2  # every one of the N steps runs
    with torch.inference_mode():
        first = pipe.sample_latents(pipe.prepare(GenerationRequest(**BASE)))
    f = pipe.vae_scale_factor
    up = F.interpolate(first, size=(2 * s // f, 2 * s // f), mode="bilinear", antialias=False)
    want = explicit_img2img(
        pipe,
        up,
        seed=11,
        steps=total,
        strength=1.0,
        sampler="euler",
        prompt="a red apple",
        negative="blurry",
        start=total - n,
    )
    np.testing.assert_allclose(out.arrays[0], want, atol=1e-6, rtol=0)
    fields = parse_parameters(out.infotexts[0])
    assert fields["Denoising strength"] == f"{strength:g}" and fields["Strength rule"] == "a1111"
    assert fields["Steps"] == str(BASE["steps"])
    # diffusers' rule (the default) runs int(N * strength) of N steps: another image
    other = pipe(**BASE, enable_hr=True, hr_scale=2, strength=strength, hr_second_pass_steps=n)
    assert "Strength rule" not in other.infotexts[0]
    if strength < 1:
        assert not np.allclose(other.arrays[0], out.arrays[0], atol=1e-3)
    # read back: the same image
    again = pipe(**{**to_generate_kwargs(fields, hires=True), "progress": False})
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(out.images[0]))


@pytest.mark.parametrize("upscaler", ["None", "Lanczos"])
def test_pixel_second_pass_is_img2img_of_the_lanczos_resized_first_image(pipe, upscaler):
    s = size(pipe)
    hr = {"hr_upscaler": upscaler, "hr_resize_x": 2 * s, "hr_sampler": "dpmpp_2m", "hr_prompt": "a green apple"}
    out = pipe(**BASE, enable_hr=True, strength=0.5, **hr)
    assert out.images[0].size == (2 * s, 2 * s)
    first = pipe(**BASE).images[0]  # the first pass as it would be saved (8 bits)
    big = first.resize((2 * s, 2 * s), Image.Resampling.LANCZOS)
    want = pipe(
        **{**BASE, "sampler": "dpmpp_2m", "prompt": "a green apple"},
        init_image=big,
        strength=0.5,
        width=2 * s,
        height=2 * s,
    )
    np.testing.assert_allclose(out.arrays[0], want.arrays[0], atol=1e-6, rtol=0)
    assert not np.allclose(out.arrays[0], np.asarray(big, np.float32) / 255, atol=0.05)  # the pass changed it


def test_batch_rows_equal_the_same_seed_alone(pipe):
    both = pipe(**{**BASE, "seed": [11, 12]}, enable_hr=True, hr_upscaler="Lanczos", strength=0.5)
    alone = pipe(**{**BASE, "seed": 12}, enable_hr=True, hr_upscaler="Lanczos", strength=0.5)
    np.testing.assert_allclose(both.arrays[1], alone.arrays[0], atol=1e-5)  # the batch contract: 1e-5 (BLAS)
    lat = pipe(**{**BASE, "seed": [11, 12]}, enable_hr=True, strength=0.5)
    lat_alone = pipe(**{**BASE, "seed": 12}, enable_hr=True, strength=0.5)
    np.testing.assert_allclose(lat.arrays[1], lat_alone.arrays[0], atol=1e-5)


def test_resize_box_follows_a1111(pipe):
    s = size(pipe)
    # both sides: cover the box keeping the aspect ratio, then cut the centre (A1111's truncate)
    out = pipe(**BASE, enable_hr=True, hr_resize_x=2 * s, hr_resize_y=s + 8, strength=0.5)
    assert out.images[0].size == (2 * s, s + 8)
    assert "Hires resize: " + f"{2 * s}x{s + 8}" in out.infotexts[0]
    # one side keeps the aspect ratio of the first pass
    out = pipe(**{**BASE, "width": s, "height": s + 8}, enable_hr=True, hr_resize_y=2 * (s + 8), strength=0.5)
    assert out.images[0].size == (2 * s, 2 * (s + 8))


def test_callback_counts_both_passes(pipe):
    seen = []
    pipe(
        **BASE,
        enable_hr=True,
        strength=0.5,
        hr_second_pass_steps=6,
        callback=lambda info: seen.append((info.step, info.steps)),
    )
    total = 4 + (6 - img2img_start(6, 0.5))
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_infotext_fields_and_round_trip(pipe, caplog):
    s = size(pipe)
    out = pipe(
        **BASE,
        enable_hr=True,
        hr_scale=2.0,
        hr_upscaler="Latent (bicubic)",
        hr_second_pass_steps=5,
        hr_sampler="DPM++ 2M",
        hr_schedule="karras",
        hr_prompt="a green apple, shiny",
        hr_negative_prompt="dark",
        strength=0.55,
    )
    text = out.infotexts[0]
    fields = parse_parameters(text)
    assert fields["Size"] == f"{s}x{s}"  # A1111 writes the first pass's size
    assert fields["Denoising strength"] == "0.55"
    assert fields["Hires upscale"] == "2" and fields["Hires steps"] == "5"
    assert fields["Hires upscaler"] == "Latent (bicubic)" and fields["Hires sampler"] == "DPM++ 2M"
    assert fields["Hires prompt"] == "a green apple, shiny" and fields["Hires negative prompt"] == "dark"
    assert fields["Schedule type"] == "Normal" and fields["Hires schedule type"] == "Karras"
    keys = list(fields)
    assert keys.index("Hires sampler") < keys.index("Hires upscale") < keys.index("Hires upscaler")
    with caplog.at_level(logging.WARNING, logger="sdengine.metadata"):
        kwargs = to_generate_kwargs(fields, hires=True)
    assert caplog.records == [], [r.getMessage() for r in caplog.records]
    assert kwargs["enable_hr"] is True and kwargs["hr_upscaler"] == "Latent (bicubic)"
    assert (kwargs["hr_scale"], kwargs["hr_second_pass_steps"], kwargs["strength"]) == (2.0, 5, 0.55)
    assert kwargs["hr_sampler"] == "dpmpp_2m" and kwargs["hr_prompt"] == "a green apple, shiny"
    assert kwargs["hr_schedule"] == "karras" and kwargs["schedule"] == "normal"
    again = pipe(**{**kwargs, "progress": False})
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(out.images[0]))
    assert again.infotexts[0] == text


def test_reading_a1111_hires_infotexts():
    base = "a cat\nSteps: 6, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 32x32, Denoising strength: 0.7, "
    kw = to_generate_kwargs(parse_parameters(base + "Hires resize: 64x48, Hires upscaler: Lanczos"), hires=True)
    assert (kw["hr_resize_x"], kw["hr_resize_y"], kw["hr_upscaler"], kw["enable_hr"]) == (64, 48, "Lanczos", True)
    kw = to_generate_kwargs(parse_parameters(base + "Hires upscale: 2, Hires sampler: DPM++ 2M Karras"), hires=True)
    assert (kw["hr_sampler"], kw["hr_schedule"]) == ("dpmpp_2m", "karras")  # A1111's old combined name
    kw = to_generate_kwargs(parse_parameters(base + "Hires upscale: 1.5"), hires=True)
    assert kw["hr_scale"] == 1.5 and kw["hr_upscaler"] == "Latent"  # A1111's default upscaler
    assert "enable_hr" not in to_generate_kwargs(parse_parameters(base + "Hires upscale: 2"))  # hires=False
    with pytest.raises(MetadataError, match="SwinIR 4x.*Latent") as e:  # ESRGAN names: tests/test_esrgan.py
        to_generate_kwargs(parse_parameters(base + "Hires upscale: 2, Hires upscaler: SwinIR 4x"), hires=True)
    assert "\n" not in str(e.value)
    with pytest.raises(MetadataError, match="Hires resize"):
        to_generate_kwargs(parse_parameters(base + "Hires resize: big"), hires=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hr_upscaler": "ESRGAN_4x"}, "unknown hires upscaler 'ESRGAN_4x'"),
        ({"hr_scale": 0}, "hr_scale must be > 0"),
        ({"hr_scale": float("nan")}, "hr_scale must be a number"),
        ({"hr_resize_x": -8}, "hr_resize_x must be an integer >= 0"),
        ({"hr_second_pass_steps": 1.5}, "hr_second_pass_steps must be an integer"),
        ({"hr_sampler": "nope"}, "hr_sampler: unknown sampler 'nope'"),
        ({"hr_schedule": "bogus"}, "hr_schedule: unknown schedule 'bogus'"),  # once named hr_sampler
        ({"strength": 0.1, "hr_second_pass_steps": 4}, "runs no step"),
        ({"init_image": Image.new("RGB", (8, 8))}, "hires fix is a txt2img option"),
        ({"hr_prompt": "x <lora:other:1>"}, "same <lora:...> tags"),
        ({"hr_scale": 0.01}, "below the model's size step"),
        ({"hr_second_pass_steps": 5000}, "at most"),
    ],
)
def test_bad_hires_settings_are_one_line_errors(pipe, kwargs, message):
    with pytest.raises(GenerationError, match=message.replace("(", "\\(").replace("+", "\\+")) as e:
        pipe(**BASE, enable_hr=True, **kwargs)
    assert "\n" not in str(e.value)


def test_defaults_are_off_and_the_names_are_a1111s():
    d = GenerationRequest.defaults()
    assert d["enable_hr"] is False and d["hr_upscaler"] == "Latent" and d["hr_second_pass_steps"] == 0
    assert set(UPSCALERS) == {
        "Latent",
        "Latent (antialiased)",
        "Latent (bicubic)",
        "Latent (bicubic antialiased)",
        "Latent (nearest)",
        "Latent (nearest-exact)",
        "None",
        "Lanczos",
    }
    with pytest.raises(GenerationError, match="enable_hr must be true or false"):
        GenerationRequest(enable_hr="yes").validate()  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- the A1111 route


def test_a1111_txt2img_route_runs_the_hires_fix(tmp_path):
    """The real ``webuiapi`` client against a live server (tiny emoji folder, 16x16 -> 32x32): the image has the
    hires size and equals the same request through the Python API."""
    from sdengine.text.bert_tokenizer import find_minilm_files

    try:
        find_minilm_files()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    make_tiny_emoji_folder(tmp_path / "models" / "tiny")
    common = {"steps": 3, "width": 16, "height": 16, "cfg_scale": 5.0}
    with live_server(server_config(tmp_path, models_dir=tmp_path / "models", model="tiny")) as s:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port, sampler="Euler", scheduler="Automatic")
        r = api.txt2img(
            prompt="a red apple",
            seed=4,
            enable_hr=True,
            hr_scale=2,
            hr_upscaler="Latent (bicubic)",
            hr_second_pass_steps=4,
            denoising_strength=0.6,
            **common,
        )
        assert r.image.size == (32, 32)
        assert r.info["ignored"] == [] and r.info["denoising_strength"] == 0.6
        fields = parse_parameters(r.image.info["parameters"])
        assert fields["Hires upscale"] == "2" and fields["Hires upscaler"] == "Latent (bicubic)"
        assert fields["Size"] == "16x16" and fields["Hires steps"] == "4"
        assert fields["Denoising strength"] == "0.6" and fields["Strength rule"] == "a1111"  # as asked, A1111's count
        pipe = load_pipeline(tmp_path / "models" / "tiny", device="cpu")
        want = pipe(
            "a red apple",
            seed=4,
            sampler="euler",
            schedule="uniform",  # A1111's "Automatic" for Euler (k-diffusion's get_sigmas)
            enable_hr=True,
            hr_upscaler="Latent (bicubic)",
            hr_second_pass_steps=4,
            strength=0.6,
            strength_rule="a1111",  # the A1111 route's step count: all 4 second-pass steps
            progress=False,
            **common,
        )
        np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), np.asarray(want.images[0]))
        # without enable_hr the hires fields change nothing and are not reported
        plain = api.txt2img(prompt="a red apple", seed=4, hr_scale=3, **common)
        assert plain.image.size == (16, 16) and plain.info["ignored"] == []
        # a model upscaler is a 400 naming it
        with pytest.raises(RuntimeError, match="ESRGAN"):
            api.txt2img(prompt="x", seed=1, enable_hr=True, hr_upscaler="R-ESRGAN 4x+", **common)
        with pytest.raises(RuntimeError, match="hr_scale must be in"):  # the server's limits hold for pass two
            api.txt2img(prompt="x", seed=1, enable_hr=True, hr_scale=1000, **common)
        # the native job API: the same request with a "hires" object
        body = {
            "prompt": "a red apple",
            "seed": 4,
            "sampler": "euler",
            "schedule": "uniform",
            "strength": 0.6,
            **common,
        }
        body["strength_rule"] = "a1111"
        body["hires"] = {"hr_upscaler": "Latent (bicubic)", "hr_second_pass_steps": 4}
        with httpx.Client(base_url=s.url, timeout=120) as c:
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            j = wait_job(c, r.json()["id"])
            assert j["state"] == "done", j
            assert j["step"] == j["steps"] == 3 + 4  # both passes, one count (A1111's rule runs all 4)
            got = c.get(j["images"][0]["url"])
            native = Image.open(io.BytesIO(got.content)).convert("RGB")
            np.testing.assert_array_equal(np.asarray(native), np.asarray(want.images[0]))
            bad = c.post("/v1/jobs", json={**body, "hires": {"hr_upscaler": "SwinIR_4x"}})
            assert bad.status_code == 400 and "SwinIR_4x" in bad.text


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_hires_flags_and_from_png_round_trip(tiny_sd1_folder, pipe, tmp_path, capsys):
    from sdengine.cli import main
    from sdengine.metadata import read_png_parameters

    s = size(pipe)
    args = ["--model", str(tiny_sd1_folder), "--steps", "4", "--sampler", "euler", "--seed", "11", "--no-progress"]
    hr = ["--hr-upscaler", "Lanczos", "--hr-steps", "5", "--hr-prompt", "a green apple", "--strength", "0.5"]
    assert main(["generate", "a red apple", *args, *hr, "--out", str(tmp_path / "a.png")]) == 0
    made = Image.open(tmp_path / "a.png")
    assert made.size == (2 * s, 2 * s)  # --hr-* turns the hires fix on; scale 2 by default
    text = read_png_parameters(tmp_path / "a.png")
    assert text is not None and "Hires upscaler: Lanczos" in text and "Denoising strength: 0.5" in text
    want = pipe(
        "a red apple",
        steps=4,
        sampler="euler",
        seed=11,
        cfg_scale=7.5,
        enable_hr=True,
        hr_upscaler="Lanczos",
        hr_second_pass_steps=5,
        hr_prompt="a green apple",
        strength=0.5,
        progress=False,
    )
    np.testing.assert_array_equal(np.asarray(made.convert("RGB")), np.asarray(want.images[0]))
    capsys.readouterr()
    rc = main(
        ["generate", "--from-png", str(tmp_path / "a.png"), "--model", str(tiny_sd1_folder)]
        + ["--no-progress", "--out", str(tmp_path / "b.png")]
    )
    assert rc == 0, capsys.readouterr().err
    assert "not reproduced" not in capsys.readouterr().err
    again = Image.open(tmp_path / "b.png")
    np.testing.assert_array_equal(np.asarray(again.convert("RGB")), np.asarray(made.convert("RGB")))
    assert read_png_parameters(tmp_path / "b.png") == text


def test_variation_seed_mixes_into_both_passes(pipe):
    s = size(pipe)
    var = {"subseed": 5, "subseed_strength": 0.4}
    out = pipe(**BASE, **var, enable_hr=True, hr_upscaler="Lanczos", strength=0.5)
    first = pipe(**BASE, **var).images[0]
    big = first.resize((2 * s, 2 * s), Image.Resampling.LANCZOS)
    want = pipe(**BASE, **var, init_image=big, strength=0.5, width=2 * s, height=2 * s)
    np.testing.assert_allclose(out.arrays[0], want.arrays[0], atol=1e-6, rtol=0)
    plain = pipe(**BASE, enable_hr=True, hr_upscaler="Lanczos", strength=0.5)
    assert np.abs(out.arrays[0] - plain.arrays[0]).mean() > 1e-3  # the variation changed the picture
    assert "Variation seed: 5" in out.infotexts[0] and "Hires upscaler: Lanczos" in out.infotexts[0]
