"""Generation metadata: A1111 infotext writing/reading (incl. strings as A1111 writes them), regeneration
kwargs, PNG `parameters` chunk, model/LoRA hashes."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdengine.diffusion.sampling import SAMPLERS
from sdengine.metadata import (
    VERSION,
    MetadataError,
    format_lora_hashes,
    format_parameters,
    hires_fix_fields,
    lora_hash,
    model_hash,
    parse_lora_hashes,
    parse_parameters,
    quote,
    read_png_parameters,
    save_png,
    to_generate_kwargs,
)

FULL = {
    "prompt": "a red apple, (detailed:1.2)",
    "negative_prompt": "blurry",
    "steps": 25,
    "sampler": "dpmpp_2m",
    "schedule": "karras",
    "cfg_scale": 7.5,
    "seed": 42,
    "width": 512,
    "height": 768,
    "model_hash": "6ce0161689",
    "model": "v1-5-pruned-emaonly",
    "strength": 0.75,
    "clip_skip": 2,
    "lora_hashes": {"add_detail": "7c6bad76eb54"},
}


# ------------------------------------------------------------------------------ writing


def test_format_full_example():
    assert format_parameters(FULL) == (
        "a red apple, (detailed:1.2)\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Clip skip: 2, "
        f'Lora hashes: "add_detail: 7c6bad76eb54", Version: {VERSION}'
    )
    assert VERSION == "sdengine 0.1.0"


def test_format_a1111_defaults_and_omissions():
    text = format_parameters(
        {
            "prompt": "cat",
            "negative_prompt": "",
            "steps": 20,
            "sampler": "euler_a",
            "cfg_scale": 7.0,
            "seed": 1,
            "width": 512,
            "height": 512,
            "clip_skip": 1,
            "strength": None,
            "lora_hashes": {},
        }
    )
    # No negative line when empty, whole floats without ".0", Clip skip 1 / None / empty omitted, no
    # Schedule type when none was given.
    assert text == f"cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Version: {VERSION}"


def test_format_sampler_names():
    def line(**kw):
        return format_parameters({"prompt": "", "seed": 1, **kw}).split("\n")[-1]

    assert line(sampler="DPM++ 2M Karras").startswith("Sampler: DPM++ 2M, Schedule type: Karras,")
    assert line(sampler="Euler a").startswith("Sampler: Euler a,")
    assert line(sampler="dpmpp_sde", schedule="Exponential").startswith(
        "Sampler: DPM++ SDE, Schedule type: Exponential"
    )
    assert line(sampler="lcm", schedule="sgm_uniform").startswith("Sampler: LCM, Schedule type: SGM Uniform")
    for name, spec in SAMPLERS.items():
        assert line(sampler=name).startswith(f"Sampler: {spec.a1111},")
    with pytest.raises(ValueError, match="unknown sampler 'euler_smea_dy'"):  # a WebUI fork's, not sdengine's
        format_parameters({"prompt": "", "sampler": "euler_smea_dy"})
    with pytest.raises(ValueError, match="schedule"):
        format_parameters({"prompt": "", "sampler": "plms", "schedule": "karras"})


def test_format_quoting_like_a1111():
    # A1111's quote: JSON string when the value has ',' ':' or a newline.
    assert quote("plain value") == "plain value"
    assert quote("a, b") == '"a, b"'
    assert quote("C:\\models\\x") == '"C:\\\\models\\\\x"'
    assert quote("two\nlines") == '"two\\nlines"'
    assert quote("émoji 😀, x") == '"émoji 😀, x"'  # ensure_ascii=False, as A1111
    # sdengine also quotes what A1111 would read back changed.
    assert quote('"quoted"') == '"\\"quoted\\""'
    assert quote(" padded ") == '" padded "'
    text = format_parameters({"prompt": "p", "steps": 1, "seed": 1, "model": "my, model: v2"})
    assert 'Model: "my, model: v2"' in text
    assert parse_parameters(text)["Model"] == "my, model: v2"


def test_format_extras_and_errors():
    text = format_parameters(
        {
            "prompt": "p",
            "steps": 1,
            "seed": 2,
            "Hires upscale": 2,
            "Hires upscaler": "Latent",
            "ADetailer model": "face_yolov8n.pt",
        }
    )
    assert text.endswith(
        f"Seed: 2, Hires upscale: 2, Hires upscaler: Latent, ADetailer model: face_yolov8n.pt, Version: {VERSION}"
    )
    with pytest.raises(MetadataError, match="unknown parameter names.*'cfg'"):
        format_parameters({"prompt": "p", "cfg": 7})
    with pytest.raises(MetadataError, match="prompt"):
        format_parameters({"steps": 2})
    with pytest.raises(MetadataError, match="width and height"):
        format_parameters({"prompt": "p", "width": 512})
    with pytest.raises(MetadataError, match="field name"):
        format_parameters({"prompt": "p", "X, y": 1})


def test_lora_hashes_value():
    assert format_lora_hashes({"a": "111", "b:c,d": "222"}) == "a: 111, bcd: 222"
    assert format_lora_hashes([("a", "1"), ("b", "2")]) == "a: 1, b: 2"
    assert parse_lora_hashes("add_detail: 7c6bad76eb54, more details v2: 0123456789ab") == {
        "add_detail": "7c6bad76eb54",
        "more details v2": "0123456789ab",
    }


# ------------------------------------------------------------------------------ reading A1111's own text

# As A1111 v1.10 writes it: multi-line prompt with a lora tag, multi-line negative, quoted values,
# extra fields from Hires fix and extensions.
A1111_FULL = """masterpiece, best quality, 1girl, <lora:add_detail:0.5>
(solo:1.2), looking at viewer,  \n
Negative prompt: (worst quality, low quality:1.4), easynegative
bad hands
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, \
Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", \
ADetailer prompt: "a face, smiling", Version: v1.10.1"""

# A1111's own docstring example (pre-1.0: no Schedule type, 8-digit hash, combined sampler names).
A1111_OLD = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, \
by Alphonse Mucha and Charlie Bowater, ((fashion photography)), ((film grain))
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, \
mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""


def test_parse_a1111_full():
    p = parse_parameters(A1111_FULL)
    assert p["Prompt"] == "masterpiece, best quality, 1girl, <lora:add_detail:0.5>\n(solo:1.2), looking at viewer,\n"
    assert p["Negative prompt"] == "(worst quality, low quality:1.4), easynegative\nbad hands"
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert p["TI hashes"] == "easynegative: c74b4e810b03"
    assert p["ADetailer prompt"] == "a face, smiling"
    assert p["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert p["Version"] == "v1.10.1"
    assert list(p)[2:8] == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size"]


def test_to_generate_kwargs_a1111_full(caplog):
    with caplog.at_level(logging.WARNING, logger="sdengine.metadata"):
        kwargs = to_generate_kwargs(parse_parameters(A1111_FULL))
    assert kwargs == {
        "prompt": "masterpiece, best quality, 1girl, <lora:add_detail:0.5>\n(solo:1.2), looking at viewer,\n",
        "negative_prompt": "(worst quality, low quality:1.4), easynegative\nbad hands",
        "steps": 28,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "cfg_scale": 7.0,
        "seed": 1234567890,
        "width": 512,
        "height": 768,
        "strength": 0.45,
        "clip_skip": 2,
        # an A1111 image: its strength counts steps and its Clip skip applies as A1111's do
        "strength_rule": "a1111",
        "clip_skip_rule": "a1111",
        "noise_source": "nv",  # no "RNG": A1111's default GPU source
    }
    # Fields that change the image but are not reproduced are named; hashes/model/version are not.
    (record,) = caplog.records
    assert "Hires upscale, Hires steps, Hires upscaler, ADetailer prompt" in record.getMessage()
    assert "Model" not in record.getMessage()


def test_every_field_sdengine_writes_is_read_back(caplog):
    text = format_parameters(
        {
            "prompt": "a cat",
            "negative_prompt": "dog",
            "steps": 6,
            "sampler": "euler",
            "schedule": "normal",
            "cfg_scale": 5.0,
            "seed": 3,
            "width": 32,
            "height": 40,
            "model": "tiny",
            "model_hash": "0123456789",
            "strength": 0.5,
            "clip_skip": 2,
            "lora_hashes": {"fruit": "abcdef012345"},
            "CFG Rescale phi": 0.7,
            "Mask blur": 4.0,
        }
    )
    with caplog.at_level(logging.WARNING, logger="sdengine.metadata"):
        kwargs = to_generate_kwargs(parse_parameters(text))
    assert caplog.records == [], [r.getMessage() for r in caplog.records]
    assert kwargs["mask_blur"] == 4.0 and kwargs["guidance_rescale"] == 0.7
    assert (kwargs["strength"], kwargs["clip_skip"], kwargs["width"], kwargs["height"]) == (0.5, 2, 32, 40)
    with pytest.raises(MetadataError, match="Mask blur: 'x' is not a number"):
        to_generate_kwargs(parse_parameters(text.replace("Mask blur: 4", "Mask blur: x")))


def test_parse_a1111_old_format():
    p = parse_parameters(A1111_OLD)
    assert p["Prompt"].startswith("girl with an artist's beret") and p["Prompt"].endswith("((film grain))")
    assert p["Negative prompt"].endswith("messy drawing")
    kwargs = to_generate_kwargs(p)
    assert kwargs["sampler"] == "euler_a" and kwargs["schedule"] == "normal"
    assert kwargs["clip_skip"] == 1  # missing Clip skip means 1, as in A1111
    assert (kwargs["width"], kwargs["height"], kwargs["seed"], kwargs["steps"]) == (512, 512, 965400086, 20)
    assert p["Model hash"] == "45dee52b"


def test_parse_no_negative_and_combined_sampler():
    text = "a cat\non a mat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 7, Size: 640x448"
    p = parse_parameters(text)
    assert p["Prompt"] == "a cat\non a mat" and p["Negative prompt"] == ""
    kwargs = to_generate_kwargs(p)
    assert (kwargs["sampler"], kwargs["schedule"], kwargs["cfg_scale"]) == ("dpmpp_2m", "karras", 5.5)
    assert "strength" not in kwargs
    # "Schedule type: Automatic" (A1111 >= 1.9 default) with a combined name keeps its schedule.
    p2 = parse_parameters("x\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, Seed: 1")
    assert to_generate_kwargs(p2)["schedule"] == "uniform"  # what A1111 ran: k-diffusion's get_sigmas


def test_parse_short_last_line_is_prompt():
    # A1111's rule: a last line with fewer than 3 fields is part of the prompt.
    p = parse_parameters("a photo\nstyle: watercolor, mood: calm")
    assert p == {"Prompt": "a photo\nstyle: watercolor, mood: calm", "Negative prompt": ""}
    assert parse_parameters("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
    assert parse_parameters("") == {"Prompt": "", "Negative prompt": ""}


def test_parse_negative_only():
    p = parse_parameters("Negative prompt: bad\nSteps: 2, Seed: 3, Size: 64x64")
    assert p["Prompt"] == "" and p["Negative prompt"] == "bad"


def test_unknown_sampler_is_a_clear_error():
    p = parse_parameters("x\nSteps: 20, Sampler: Euler SMEA Dy, Seed: 1, Size: 512x512")
    with pytest.raises(MetadataError, match="unknown sampler 'Euler SMEA Dy'.*lists all"):
        to_generate_kwargs(p)
    with pytest.raises(MetadataError, match="Size"):
        to_generate_kwargs(parse_parameters("x\nSteps: 20, Seed: 1, Size: big"))
    with pytest.raises(MetadataError, match="Steps: 'many'"):
        to_generate_kwargs(parse_parameters("x\nSteps: many, Seed: 1, Size: 8x8"))


# ------------------------------------------------------------------------------ round trip (hypothesis)

_TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ 019,:;()[]<>\"'\\/-_.\n\t") + ["é", "😀", "\u00a0"]), max_size=60)
_VALUE_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(list(',:"\\ \n\t')), st.characters(codec="utf-8", exclude_categories=("Cs",))),
    max_size=30,
)


def _as_a1111_reads(text: str) -> str:
    """What survives A1111's layout: each line stripped, leading empty lines dropped."""
    lines = [line.strip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


@st.composite
def _params(draw):
    sampler = draw(st.sampled_from(sorted(SAMPLERS)))
    p = {
        "prompt": draw(_TEXT),
        "negative_prompt": draw(_TEXT),
        "steps": draw(st.integers(1, 1000)),
        "sampler": sampler,
        "schedule": draw(st.sampled_from(SAMPLERS[sampler].schedules)),
        "cfg_scale": draw(st.floats(0, 30, allow_nan=False)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "width": draw(st.integers(1, 256)) * 8,
        "height": draw(st.integers(1, 256)) * 8,
        "model_hash": draw(st.text("0123456789abcdef", min_size=10, max_size=10)),
        "model": draw(_VALUE_TEXT),
        "clip_skip": draw(st.integers(1, 12)),
    }
    if draw(st.booleans()):
        p["strength"] = draw(st.floats(0, 1, allow_nan=False))
    if draw(st.booleans()):
        p["Hires upscaler"] = draw(_VALUE_TEXT)
    return p


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_params())
def test_round_trip(params):
    for text in (params["prompt"], params["negative_prompt"]):
        assume(not any(line.strip().startswith("Negative prompt:") for line in text.split("\n")))
    parsed = parse_parameters(format_parameters(params))
    kwargs = to_generate_kwargs(parsed)
    expected = {
        "prompt": _as_a1111_reads(params["prompt"]),
        "negative_prompt": _as_a1111_reads(params["negative_prompt"]),
        **{k: params[k] for k in ("steps", "sampler", "schedule", "cfg_scale", "seed", "width", "height", "clip_skip")},
    }
    if "strength" in params:
        expected["strength"] = params["strength"]
    assert kwargs == expected
    assert parsed["Model"] == params["model"]
    assert parsed["Model hash"] == params["model_hash"]
    assert parsed["Version"] == VERSION
    if "Hires upscaler" in params:
        assert parsed["Hires upscaler"] == params["Hires upscaler"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"\A[A-Z][a-z ]{1,12}[a-z]\Z"), _VALUE_TEXT, max_size=6))
def test_round_trip_extra_fields(extras):
    params = {"prompt": "p", "steps": 2, "seed": 3, **extras}
    parsed = parse_parameters(format_parameters(params))
    for key, value in extras.items():
        assert parsed[key] == value


# ------------------------------------------------------------------------------ PNG


def _png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        assert int.from_bytes(data[pos + 8 + n : pos + 12 + n], "big") == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + n
    return chunks


def test_png_write_read_text_chunk(tmp_path):
    img = Image.new("RGB", (16, 8), (200, 30, 40))
    text = format_parameters(FULL)
    path = save_png(img, tmp_path / "sub" / "out.png", text)
    assert path == tmp_path / "sub" / "out.png"
    assert read_png_parameters(path) == text
    # A plain tEXt chunk named "parameters" (Latin-1 text), as A1111 writes it.
    (body,) = [b for kind, b in _png_chunks(path) if kind == b"tEXt"]
    assert body == b"parameters\x00" + text.encode("latin-1")
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.png"]  # no temp file left
    with Image.open(path) as back:
        assert back.size == (16, 8) and back.getpixel((3, 3)) == (200, 30, 40)


def test_png_unicode_uses_itxt_and_overwrites(tmp_path):
    img = Image.new("RGB", (4, 4))
    path = tmp_path / "u.png"
    save_png(img, path, "first")
    text = "東京の夜景, 😀\nNegative prompt: ぼやけ\nSteps: 2, Seed: 1, Size: 4x4"
    save_png(img, path, text)
    assert read_png_parameters(path) == text
    assert any(kind == b"iTXt" and body.startswith(b"parameters\x00") for kind, body in _png_chunks(path))
    assert parse_parameters(read_png_parameters(path))["Negative prompt"] == "ぼやけ"


def test_png_without_parameters_and_bad_files(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("L", (2, 2)).save(plain)
    assert read_png_parameters(plain) is None
    with pytest.raises(MetadataError, match="missing.png"):
        read_png_parameters(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(MetadataError, match="junk.png"):
        read_png_parameters(junk)


def test_save_png_failure_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        save_png(Image.new("CMYK", (2, 2)), tmp_path / "x.png", "p")  # PNG cannot hold CMYK
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_save_png_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = save_png(Image.new("RGB", (2, 2)), tmp_path / "x.png", "p")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert read_png_parameters(out) == "p"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ------------------------------------------------------------------------------ hashes


def test_model_hash_streams_whole_file(tmp_path):
    path = tmp_path / "model.safetensors"
    data = bytes(range(256)) * (5 * 4096 + 7)  # > 5 MiB, not a multiple of the block size
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    assert len(model_hash(path)) == 10


def test_lora_hash_skips_safetensors_header(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(12.0).reshape(3, 4)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(a))
    save_file(tensors, str(b), metadata={"ss_output_name": "something long " * 10})
    raw = a.read_bytes()
    offset = 8 + int.from_bytes(raw[:8], "little")
    assert lora_hash(a) == hashlib.sha256(raw[offset:]).hexdigest()[:12]
    assert lora_hash(a) == lora_hash(b)  # metadata edits keep kohya's/A1111's hash
    assert model_hash(a) != model_hash(b)
    other = tmp_path / "c.pt"
    other.write_bytes(b"abc")
    assert lora_hash(other) == hashlib.sha256(b"abc").hexdigest()[:12]
    tiny = tmp_path / "d.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(MetadataError, match="too short"):
        lora_hash(tiny)


def test_hires_fix_fields_are_found_in_order():
    assert hires_fix_fields(parse_parameters(A1111_FULL)) == {
        "Hires upscale": "2",
        "Hires steps": "15",
        "Hires upscaler": "R-ESRGAN 4x+ Anime6B",
    }
    assert hires_fix_fields(parse_parameters(A1111_OLD)) == {}


def test_sampler_options_from_sdengines_field_or_a1111s_eta():
    base = "a cat\nSteps: 20, Sampler: {s}, CFG scale: 7, Seed: 1, Size: 64x64, {extra}"
    got = to_generate_kwargs(parse_parameters(base.format(s="Euler a", extra='Sampler options: "{\\"eta\\": 0.5}"')))
    assert got["sampler_options"] == {"eta": 0.5}
    got = to_generate_kwargs(parse_parameters(base.format(s="Euler a", extra="Eta: 0.7")))  # A1111's ancestral eta
    assert got["sampler_options"] == {"eta": 0.7}
    got = to_generate_kwargs(parse_parameters(base.format(s="DDIM", extra="Eta DDIM: 0.3")))  # and DDIM's
    assert got["sampler_options"] == {"eta": 0.3}
    got = to_generate_kwargs(parse_parameters(base.format(s="Euler", extra="Eta: 0.7")))  # Euler takes no eta
    assert "sampler_options" not in got
    for bad in ('Sampler options: "[1]"', 'Sampler options: "{\\"eta\\": \\"x\\"}"', "Sampler options: nope"):
        with pytest.raises(MetadataError, match="Sampler options: .* is not a JSON object of numbers"):
            to_generate_kwargs(parse_parameters(base.format(s="Euler a", extra=bad)))
    with pytest.raises(MetadataError, match="unknown resize mode"):
        to_generate_kwargs(parse_parameters(base.format(s="Euler", extra="Resize mode: zoom")))


def test_a1111s_sigma_fields_are_the_churn_and_noise_options_of_the_samplers_that_take_them():
    base = "a cat\nSteps: 20, Sampler: {s}, CFG scale: 7, Seed: 1, Size: 64x64, {extra}"
    extra = "Sigma churn: 2, Sigma tmin: 0.5, Sigma tmax: 9, Sigma noise: 0.9"
    got = to_generate_kwargs(parse_parameters(base.format(s="Euler", extra=extra)))
    assert got["sampler_options"] == {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 9.0, "s_noise": 0.9}
    got = to_generate_kwargs(parse_parameters(base.format(s="DPM2 a", extra=extra)))  # s_noise only
    assert got["sampler_options"] == {"s_noise": 0.9}
    got = to_generate_kwargs(parse_parameters(base.format(s="DPM++ 2M", extra=extra)))  # none
    assert "sampler_options" not in got
    with pytest.raises(MetadataError, match="Sigma churn: 'x' is not a number"):
        to_generate_kwargs(parse_parameters(base.format(s="Euler", extra="Sigma churn: x")))
    # and written so by the pipeline's infotext (only where not the default), other options as sdengine's JSON
    from sdengine.pipeline.infotext import call_parameters

    params = call_parameters(prompt="a", negative_prompt="", steps=4, sampler="euler", schedule="normal",
                             cfg_scale=7, seed=1, width=64, height=64, model="m", model_hash=None, strength=None,
                             clip_skip=1, guidance_rescale=0, loras=[], n_tag_loras=0, lora_dir=None, controlnets=[],
                             mask_blur=None, sampler_options={"s_churn": 2.0, "s_noise": 1.0, "eta": 0.5})  # fmt: skip
    assert params["Sigma churn"] == 2.0 and "Sigma noise" not in params
    assert params["Sampler options"] == '{"eta": 0.5}'


_A1111_CONTROLNET = (
    "a cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, "
    'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.8, Resize Mode: Crop and '
    "Resize, Low Vram: False, Processor Res: 384, Threshold A: 50, Threshold B: 150, Guidance Start: 0.1, Guidance "
    'End: 0.9, Pixel Perfect: False, Control Mode: ControlNet is more important", Version: v1.10.1'
)


def test_an_a1111_controlnet_infotext_is_read_with_the_extensions_step_rule_and_preprocessor():
    from sdengine.metadata import recorded_controlnets

    (unit,) = recorded_controlnets(parse_parameters(_A1111_CONTROLNET))
    assert (unit.name, unit.hash, unit.weight, unit.start, unit.end) == (
        "control_v11p_sd15_canny",
        "d14c016b",
        0.8,
        0.1,
        0.9,
    )
    assert unit.rule == "a1111"  # A1111 wrote it: its extension counted the guidance steps
    assert (unit.preprocessor, dict(unit.options), unit.processor_res) == ("canny", {"low": 50.0, "high": 150.0}, 384)
    assert unit.mode == "controlnet" and unit.resize_mode == "crop and resize"  # "ControlNet is more important"


def test_an_sdengine_controlnet_infotext_keeps_the_step_rule_it_recorded():
    from sdengine.metadata import recorded_controlnets

    sdengine = _A1111_CONTROLNET.replace("Version: v1.10.1", f"Version: {VERSION}")
    assert [u.rule for u in recorded_controlnets(parse_parameters(sdengine))] == ["diffusers"]
    marked = sdengine + ", ControlNet step rule: a1111"
    assert [u.rule for u in recorded_controlnets(parse_parameters(marked))] == ["a1111"]


def test_a_controlnet_unit_naming_an_unknown_preprocessor_or_option_is_refused_before_it_runs():
    from sdengine.errors import ControlNetError
    from sdengine.pipeline.control import ControlUnit

    with pytest.raises(ControlNetError, match="unknown ControlNet preprocessor 'depth'"):
        ControlUnit("m", None, module="depth")
    with pytest.raises(ControlNetError, match="'canny' has no options radius"):
        ControlUnit("m", None, module="canny", module_options={"radius": 3.0})


def test_an_a1111_controlnet_setting_sdengine_does_not_reproduce_is_warned_of(caplog):
    """Pixel Perfect is kept for the reader to work the resolution out (once only warned of as not reproduced:
    nothing is warned of now; the name is the reliability row's); a Processor Res of -1 is the extension's default
    for a preprocessor that scales, 512, and nothing for one that does not."""
    from sdengine.metadata import recorded_controlnets

    text = _A1111_CONTROLNET.replace("ControlNet is more important", "My prompt is more important")
    text = text.replace("Pixel Perfect: False", "Pixel Perfect: True")
    with caplog.at_level(logging.WARNING, logger="sdengine.metadata"):
        (unit,) = recorded_controlnets(parse_parameters(text))
    assert unit.mode == "prompt"  # the extension's soft weights: reproduced (pipeline.control's modes)
    assert unit.pixel_perfect and unit.processor_res == 384
    assert caplog.records == []
    default = _A1111_CONTROLNET.replace("Processor Res: 384", "Processor Res: -1")
    (unit,) = recorded_controlnets(parse_parameters(default))
    assert unit.processor_res == 512 and not unit.pixel_perfect
    invert = default.replace("Module: canny", "Module: invert")
    (unit,) = recorded_controlnets(parse_parameters(invert.replace("Pixel Perfect: False", "Pixel Perfect: True")))
    assert unit.processor_res is None and not unit.pixel_perfect


def test_an_a1111_controlnet_with_an_unknown_resize_mode_or_a_bad_threshold_is_a_one_line_error():
    from sdengine.metadata import recorded_controlnets

    for old, new, match in (
        ("Crop and Resize", "Outpaint", "Resize Mode 'Outpaint' is not a resize mode"),
        ("Threshold A: 50", "Threshold A: low", "preprocessor value is not a number"),
    ):
        with pytest.raises(MetadataError, match=match):
            recorded_controlnets(parse_parameters(_A1111_CONTROLNET.replace(old, new)))


def test_a1111_infotexts_mean_a1111s_defaults_for_unipc_and_the_noise_source():
    """An A1111 infotext leaves out what is A1111's default: its GPU noise ("RNG", sdengine's "nv") and UniPC's
    bh1 of order 3 ("UniPC variant" / "UniPC order"); they were read as sdengine's defaults (CPU noise, bh2 of
    order 2): another image. An sdengine infotext without them keeps sdengine's own (it writes "RNG: NV" and,
    now, both UniPC fields)."""
    a1111 = "a cat\nSteps: 20, Sampler: UniPC, CFG scale: 7, Seed: 1, Size: 64x64, Version: v1.10.1"
    got = to_generate_kwargs(parse_parameters(a1111))
    assert got["noise_source"] == "nv" and got["sampler_options"] == {"variant": "bh1", "order": 3}
    got = to_generate_kwargs(parse_parameters(a1111 + ", RNG: CPU, UniPC variant: bh2, UniPC order: 1"))
    assert got["noise_source"] == "cpu" and got["sampler_options"] == {"variant": "bh2", "order": 1}
    own = a1111.replace("Version: v1.10.1", "Version: sdengine 1.0")
    got = to_generate_kwargs(parse_parameters(own))
    assert "noise_source" not in got and "sampler_options" not in got
    for bad, said in (("UniPC variant: vary_coeff", "vary_coeff"), ("UniPC order: 5", "UniPC order: 5 is not 1, 2")):
        with pytest.raises(MetadataError, match=said):
            to_generate_kwargs(parse_parameters(f"{a1111}, {bad}"))


def test_eta_and_unipc_options_are_written_as_a1111s_fields():
    """sdengine wrote an eta and UniPC's variant/order into its own "Sampler options" JSON, which A1111 does not
    read; it writes A1111's "Eta" / "Eta DDIM" (only where not A1111's default for the sampler) and, for UniPC,
    both "UniPC variant" and "UniPC order"; the other options stay in "Sampler options", and both are read."""
    from sdengine.pipeline.infotext import call_parameters

    def written(sampler, options):
        return call_parameters(prompt="a", negative_prompt="", steps=4, sampler=sampler, schedule="normal",
                               cfg_scale=7, seed=1, width=64, height=64, model="m", model_hash=None, strength=None,
                               clip_skip=1, guidance_rescale=0, loras=[], n_tag_loras=0, lora_dir=None,
                               controlnets=[], mask_blur=None, sampler_options=options)  # fmt: skip

    assert written("euler_a", {"eta": 0.5})["Eta"] == 0.5 and "Sampler options" not in written("euler_a", {"eta": 0.5})
    assert "Eta" not in written("euler_a", {"eta": 1.0}) and "Eta DDIM" not in written("ddim", {"eta": 0.0})
    assert written("ddim", {"eta": 0.5})["Eta DDIM"] == 0.5
    params = written("unipc", {"corrector": 0})
    assert (params["UniPC variant"], params["UniPC order"]) == ("bh2", 2)  # sdengine's own defaults, written
    assert params["Sampler options"] == '{"corrector": 0}'
    text = format_parameters({**params, "prompt": "a"})
    got = to_generate_kwargs(parse_parameters(text))
    assert got["sampler_options"] == {"corrector": 0, "variant": "bh2", "order": 2}
    params = written("dpm2_a", {"eta": 0.25, "s_noise": 0.5})
    assert to_generate_kwargs(parse_parameters(format_parameters({**params, "prompt": "a"})))["sampler_options"] == {
        "eta": 0.25,
        "s_noise": 0.5,
    }


def test_refiner_switch_of_an_infotext_is_its_rule_and_a1111s_none():
    """The hand-off an infotext records: A1111's (no "Refiner switch rule", not made by sdengine) switches by A1111's
    rule, sdengine's by diffusers' unless its field says otherwise; no "Refiner switch at" is A1111's None (0)."""
    from sdengine.metadata import refiner_switch

    a1111 = (
        "a\nSteps: 5, Sampler: Euler, Seed: 1, Size: 64x64, Refiner: r [abc123], Refiner switch at: 0.7, Version: v1"
    )
    assert refiner_switch(parse_parameters(a1111)) == (0.7, "a1111")
    own = a1111.replace("Version: v1", "Version: sdengine 1.0")
    assert refiner_switch(parse_parameters(own)) == (0.7, "diffusers")
    assert refiner_switch(parse_parameters(own + ", Refiner switch rule: a1111")) == (0.7, "a1111")
    assert refiner_switch(parse_parameters(a1111.replace(", Refiner switch at: 0.7", ""))) == (0.0, "a1111")
    assert refiner_switch(parse_parameters("a\nSteps: 5, Seed: 1, Size: 64x64")) is None
    with pytest.raises(MetadataError, match="Refiner switch rule: 'comfy' is not one of diffusers, a1111"):
        refiner_switch(parse_parameters(own + ", Refiner switch rule: comfy"))
    with pytest.raises(MetadataError, match="Refiner switch at: 'x' is not a number"):
        refiner_switch(parse_parameters(a1111.replace("0.7", "x")))
