"""``sdengine generate --ip-adapter FILE --ip-image IMAGE --clip-vision ENCODER``: the same image as the Python call
with the same unit, the ``IP-Adapter N`` infotext field written and read back, ``--from-png`` making the image
again from the pictures given again, and the one-line errors (tiny random SD 1.x model, adapters and CLIP vision
encoder)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")

import sdengine  # noqa: E402
from _ip_models import random_adapter, random_encoder  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.metadata import (  # noqa: E402
    format_ip_adapter,
    format_parameters,
    model_hash,
    parse_parameters,
    recorded_ip_adapters,
    save_png,
    to_generate_kwargs,
)
from sdengine.nn.ip_adapter import cross_attention_layers  # noqa: E402
from sdengine.pipeline.ip_adapter import IPAdapterUnit  # noqa: E402
from sdengine.weights.ip_adapter_file import save_ip_adapter  # noqa: E402

SIZE, STEPS, SEED = 32, 4, 5
PROMPT, NEGATIVE = "a red apple on a table", "blurry"
EMBED, HIDDEN = 24, 40  # the tiny encoder's projection (plain adapters read it) and hidden width (Plus)
FLAGS = ["--steps", str(STEPS), "--sampler", "euler", "--schedule", "normal", "--cfg", "7.5", "--seed", str(SEED)]
CALL = dict(steps=STEPS, sampler="euler", schedule="normal", cfg_scale=7.5, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def kit(tiny_sd1_folder, tmp_path_factory):
    """The model folder, its pipeline and a folder with adapters/, encoders/image_encoder and two pictures."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    root = tmp_path_factory.mktemp("ipcli")
    (root / "adapters").mkdir()
    save_ip_adapter(random_adapter(pipe.unet, "plain", EMBED, 1), root / "adapters" / "ip-adapter_tiny.safetensors")
    save_ip_adapter(random_adapter(pipe.unet, "plus", HIDDEN, 2), root / "adapters" / "ip-adapter-plus_tiny.bin")
    hf = random_encoder(HIDDEN, EMBED, 0, layers=3)
    hf.save_pretrained(root / "encoders" / "image_encoder")
    picture(40, 48).save(root / "cat.png")
    picture(32, 32, seed=2).save(root / "dog.png")
    picture(SIZE, SIZE, seed=3).save(root / "init.png")
    return tiny_sd1_folder, pipe, root


def _generate(*args: str) -> int:
    return main(["generate", *args, "--no-progress"])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _refused(capsys, *args: str) -> str:
    capsys.readouterr()
    rc = _generate(*args)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("sdengine: error: "), err
    return err


def test_txt2img_equals_the_python_call_and_its_infotext_reads_back(kit, tmp_path, capsys):
    folder, pipe, root = kit
    adapter, encoder = root / "adapters" / "ip-adapter_tiny.safetensors", root / "encoders" / "image_encoder"
    out = tmp_path / "cli.png"
    ip = ["--ip-adapter", str(adapter), "--ip-image", str(root / "cat.png"), "--ip-scale", "0.8"]
    rc = _generate(
        PROMPT,
        "--model",
        str(folder),
        "--negative",
        NEGATIVE,
        *FLAGS,
        *ip,
        "--clip-vision",
        str(encoder),
        "--out",
        str(out),
    )
    assert rc == 0, capsys.readouterr().err
    unit = IPAdapterUnit(str(adapter), scale=0.8, images=str(root / "cat.png"), clip_vision=str(encoder))
    r = pipe(PROMPT, NEGATIVE, ip_adapters=[unit], **CALL)
    assert np.array_equal(_pixels(out), np.asarray(r.images[0]))  # bit for bit
    plain = pipe(PROMPT, NEGATIVE, **CALL)
    assert np.abs(_pixels(out).astype(int) - np.asarray(plain.images[0]).astype(int)).max() > 8  # it does something

    text = Image.open(out).info["parameters"]
    assert text == r.infotexts[0]
    parsed = parse_parameters(text)
    (rec,) = recorded_ip_adapters(parsed)
    assert (rec.name, rec.hash, rec.weight) == ("ip-adapter_tiny", model_hash(adapter), 0.8)
    assert (rec.clip_vision, rec.clip_vision_hash) == ("image_encoder", model_hash(encoder / "model.safetensors"))
    assert (rec.negative_rule, rec.images, rec.start, rec.end) == ("diffusers", 1, 0.0, 1.0)
    # A1111's own field regex reads the field whole (one quoted value)
    fields = dict(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', text.splitlines()[-1]))
    assert fields["IP-Adapter 0"].startswith('"Model: ip-adapter_tiny [')


def test_infotext_field_round_trip_and_no_warning(caplog):
    """format -> parameters text -> parse -> the same values (an inexact float too); to_generate_kwargs leaves the
    field to the caller without a "not reproduced" warning."""
    value = format_ip_adapter(
        "ip-adapter, plus: sd15",  # separators A1111's readers split on are taken out of a name
        model_hash="0123456789",
        weight=0.1 + 0.2,
        clip_vision="clip_vision_h",
        clip_vision_hash="abcdef0123",
        negative_rule="comfyui",
        images=3,
        start=0.25,
        end=0.75,
        scaling="kv",
        layer_scales=(0.5, 0.1 + 0.2, 0.0),
    )
    text = format_parameters({"prompt": "p", "steps": 4, "seed": 1, "IP-Adapter 1": value, "IP-Adapter 0": "Model: x"})
    parsed = parse_parameters(text)
    first, second = recorded_ip_adapters(parsed)
    assert (first.name, first.hash, first.weight, first.clip_vision, first.images) == ("x", None, 1.0, None, None)
    assert second.name == "ip-adapter plus sd15" and second.hash == "0123456789"
    assert second.weight == 0.1 + 0.2 and (second.clip_vision, second.clip_vision_hash) == (
        "clip_vision_h",
        "abcdef0123",
    )
    assert (second.negative_rule, second.images, second.start, second.end) == ("comfyui", 3, 0.25, 0.75)
    assert (second.scaling, second.layer_scales) == ("kv", (0.5, 0.1 + 0.2, 0.0))
    assert (first.scaling, first.layer_scales) == ("output", None)
    with caplog.at_level("WARNING"):
        to_generate_kwargs(parsed)
    assert "IP-Adapter" not in caplog.text
    for bad in ("Weight: 1", "Model: x, Weight: heavy", "Model: x, Images: 0", "Model: x, Layer weights: 1 nan"):
        with pytest.raises(SdengineError, match="IP-Adapter 0") as e:
            recorded_ip_adapters({"IP-Adapter 0": bad})
        assert "\n" not in str(e.value)


def test_a_units_window_is_written(kit):
    """A unit that runs over part of the steps (``start`` / ``end``) writes them."""
    from sdengine.pipeline.infotext import ip_adapter_infotext

    _, _, root = kit
    adapter, encoder = root / "adapters" / "ip-adapter_tiny.safetensors", root / "encoders" / "image_encoder"
    fields = dict(adapter=str(adapter), scale=0.5, images=["a", "b"], clip_vision=str(encoder), negative_rule="comfyui")
    whole = recorded_ip_adapters({"IP-Adapter 0": ip_adapter_infotext(IPAdapterUnit(**fields))})[0]
    part = recorded_ip_adapters({"IP-Adapter 0": ip_adapter_infotext(IPAdapterUnit(**fields, start=0.2, end=0.8))})
    assert (whole.start, whole.end, whole.images, whole.weight) == (0.0, 1.0, 2, 0.5)
    assert (part[0].start, part[0].end) == (0.2, 0.8) and part[0].hash == model_hash(adapter)


def test_from_png_makes_it_again_with_the_picture(kit, tmp_path, capsys):
    folder, pipe, root = kit
    adapter, encoder = root / "adapters" / "ip-adapter_tiny.safetensors", root / "encoders" / "image_encoder"
    made = tmp_path / "made.png"
    ip = ["--ip-adapter", str(adapter), "--ip-image", str(root / "cat.png"), "--clip-vision", str(encoder)]
    assert _generate(PROMPT, "--model", str(folder), *FLAGS, *ip, "--ip-scale", "0.7", "--out", str(made)) == 0
    dirs = ["--ip-adapters-dir", str(root / "adapters"), "--clip-vision-dir", str(root / "encoders")]
    cat = ["--ip-image", str(root / "cat.png")]
    base = ["--from-png", str(made), "--model", str(folder)]
    for k, extra in enumerate(([*cat, *dirs], ip)):  # looked up by name and hash, or named again
        again = tmp_path / f"again{k}.png"
        assert _generate(*base, *extra, "--out", str(again)) == 0, capsys.readouterr().err
        assert np.array_equal(_pixels(again), _pixels(made)), k
        assert Image.open(again).info["parameters"] == Image.open(made).info["parameters"]
    # a flag over the recorded weight: scale 0 is the image without the adapter
    zero = tmp_path / "zero.png"
    assert _generate(*base, *ip, "--ip-scale", "0", "--out", str(zero)) == 0
    assert np.array_equal(_pixels(zero), np.asarray(pipe(PROMPT, **CALL).images[0]))

    err = _refused(capsys, *base, *dirs, "--out", str(tmp_path / "x.png"))
    assert "was made with IP-Adapter ip-adapter_tiny: give its picture(s) with --ip-image" in err
    err = _refused(capsys, *base, *cat, "--out", str(tmp_path / "x.png"))
    assert "'ip-adapter_tiny', which is not found: give --ip-adapters-dir FOLDER or --ip-adapter FILE" in err
    err = _refused(capsys, *base, *cat, "--ip-adapters-dir", str(root / "adapters"), "--out", str(tmp_path / "x.png"))
    assert "the CLIP vision encoder 'image_encoder', which is not found: give --clip-vision-dir" in err
    other = tmp_path / "other"
    other.mkdir()
    save_ip_adapter(
        random_adapter(pipe.unet, "plain", EMBED, 9), other / "ip-adapter_tiny.safetensors"
    )  # same name, new weights
    err = _refused(capsys, *base, *cat, *dirs[2:], "--ip-adapters-dir", str(other), "--out", str(tmp_path / "x.png"))
    assert f"[{model_hash(adapter)}], but {other / 'ip-adapter_tiny.safetensors'} has hash" in err
    assert "give the same file with --ip-adapter FILE" in err
    err = _refused(capsys, *base, *cat, *dirs, "--ip-image", str(root / "dog.png"), "--out", str(tmp_path / "x.png"))
    assert "1 --ip-adapter but 2 --ip-image" in err
    err = _refused(capsys, *base, "--ip-image", f"{root / 'cat.png'}+{root / 'dog.png'}", *dirs, "--out", "x.png")
    assert "IP-Adapter 0 (ip-adapter_tiny) took 1 picture(s), --ip-image gives 2" in err
    assert not list(tmp_path.glob("x.png"))


def test_img2img_two_adapters_several_pictures_and_from_png(kit, tmp_path, capsys):
    """img2img with a plain and a Plus adapter, the second with two pictures, ComfyUI's negative rule for both: the
    Python call's image; --from-png makes it again (each adapter's own weight and rule, the picture count)."""
    folder, pipe, root = kit
    plain, plus = root / "adapters" / "ip-adapter_tiny.safetensors", root / "adapters" / "ip-adapter-plus_tiny.bin"
    encoder = root / "encoders" / "image_encoder"
    both = f"{root / 'cat.png'}+{root / 'dog.png'}"
    out = tmp_path / "i2i.png"
    ip = [
        "--ip-adapter",
        str(plain),
        "--ip-image",
        str(root / "dog.png"),
        "--ip-adapter",
        str(plus),
        "--ip-image",
        both,
    ]
    rc = _generate(
        PROMPT,
        "--model",
        str(folder),
        "--negative",
        NEGATIVE,
        *FLAGS,
        "--init-image",
        str(root / "init.png"),
        "--strength",
        "0.6",
        *ip,
        "--ip-scale",
        "0.5",
        "--ip-scale",
        "0.9",
        "--clip-vision",
        str(encoder),
        "--ip-negative-rule",
        "ComfyUI",
        "--out",
        str(out),
    )
    assert rc == 0, capsys.readouterr().err
    units = [
        IPAdapterUnit(
            str(plain), scale=0.5, images=[str(root / "dog.png")], clip_vision=str(encoder), negative_rule="comfyui"
        ),
        IPAdapterUnit(
            str(plus),
            scale=0.9,
            images=[str(root / "cat.png"), str(root / "dog.png")],
            clip_vision=str(encoder),
            negative_rule="comfyui",
        ),
    ]
    r = pipe(PROMPT, NEGATIVE, ip_adapters=units, init_image=str(root / "init.png"), strength=0.6, **CALL)
    assert np.array_equal(_pixels(out), np.asarray(r.images[0]))
    without = pipe(PROMPT, NEGATIVE, init_image=str(root / "init.png"), strength=0.6, **CALL).images[0]
    assert np.abs(_pixels(out).astype(int) - np.asarray(without).astype(int)).max() > 8
    first, second = recorded_ip_adapters(parse_parameters(Image.open(out).info["parameters"]))
    assert (first.name, first.weight, first.images, first.negative_rule) == ("ip-adapter_tiny", 0.5, 1, "comfyui")
    assert (second.name, second.weight, second.images) == ("ip-adapter-plus_tiny", 0.9, 2)

    again = tmp_path / "again.png"
    rc = _generate(
        "--from-png",
        str(out),
        "--model",
        str(folder),
        "--init-image",
        str(root / "init.png"),
        "--ip-image",
        str(root / "dog.png"),
        "--ip-image",
        both,
        "--ip-adapters-dir",
        str(root / "adapters"),
        "--clip-vision",
        str(encoder),
        "--out",
        str(again),
    )
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(_pixels(again), _pixels(out))


def test_hires_fix_keeps_the_adapter_and_from_png(kit, tmp_path, capsys):
    """The hires fix's two passes with an adapter: the Python call's image, and --from-png's."""
    folder, pipe, root = kit
    adapter, encoder = root / "adapters" / "ip-adapter-plus_tiny.bin", root / "encoders" / "image_encoder"
    out = tmp_path / "hires.png"
    hires = ["--hires", "--hr-scale", "1.5", "--hr-steps", "2", "--strength", "0.5"]
    ip = ["--ip-adapter", str(adapter), "--ip-image", str(root / "cat.png"), "--clip-vision", str(encoder)]
    assert _generate(PROMPT, "--model", str(folder), *FLAGS, *hires, *ip, "--out", str(out)) == 0
    unit = IPAdapterUnit(str(adapter), images=[str(root / "cat.png")], clip_vision=str(encoder))
    kw = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, strength=0.5)
    r = pipe(PROMPT, ip_adapters=[unit], **kw, **CALL)
    assert _pixels(out).shape == (48, 48, 3) and np.array_equal(_pixels(out), np.asarray(r.images[0]))
    assert np.abs(_pixels(out).astype(int) - np.asarray(pipe(PROMPT, **kw, **CALL).images[0]).astype(int)).max() > 8
    again = tmp_path / "again.png"
    rc = _generate("--from-png", str(out), "--model", str(folder), *ip, "--out", str(again))
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(_pixels(again), _pixels(out))


def test_one_line_errors(kit, tmp_path, capsys):
    folder, _, root = kit
    adapter, encoder = str(root / "adapters" / "ip-adapter_tiny.safetensors"), str(root / "encoders" / "image_encoder")
    cat = str(root / "cat.png")
    run = [PROMPT, "--model", str(folder), *FLAGS, "--out", str(tmp_path / "o.png")]
    cases = [
        (["--ip-image", cat], "--ip-image is the picture of an --ip-adapter: give --ip-adapter FILE too"),
        (["--ip-adapter", adapter, "--clip-vision", encoder], "1 --ip-adapter but 0 --ip-image"),
        (["--ip-adapter", adapter, "--ip-adapter", adapter, "--ip-image", cat], "2 --ip-adapter but 1 --ip-image"),
        (["--ip-scale", "0.5"], "--ip-scale has no effect without --ip-adapter"),
        (["--clip-vision", encoder], "--clip-vision has no effect without --ip-adapter"),
        (["--ip-adapter", adapter, "--ip-image", cat], "give --clip-vision FILE_OR_FOLDER"),
        (
            ["--ip-adapter", adapter[:-1], "--ip-image", cat, "--clip-vision", encoder],
            "ip-adapter_tiny.safetensor: no such file; did you mean 'ip-adapter_tiny.safetensors'?",
        ),
        (
            ["--ip-adapter", adapter, "--ip-image", cat.replace(".png", ".pgn"), "--clip-vision", encoder],
            "cat.pgn: no such file; did you mean 'cat.png'?",
        ),
        (
            ["--ip-adapter", adapter, "--ip-image", f"{cat}+", "--clip-vision", encoder],
            "an empty picture name",
        ),
        (
            ["--ip-adapter", adapter, "--ip-image", cat, "--clip-vision", encoder + "s"],
            "image_encoders: no such file; did you mean 'image_encoder'?",
        ),
        (
            ["--ip-adapter", adapter, "--ip-image", cat, "--clip-vision", encoder, "--ip-negative-rule", "comfy"],
            "unknown IP-Adapter negative rule 'comfy'; did you mean 'comfyui'?",
        ),
        (
            [
                "--ip-adapter",
                adapter,
                "--ip-image",
                cat,
                "--clip-vision",
                encoder,
                "--ip-scale",
                "1",
                "--ip-scale",
                "2",
            ],
            "2 --ip-scale for 1 --ip-adapter: give one for all, or one per --ip-adapter",
        ),
        (["--ip-adapter", adapter, "--ip-image", cat, "--clip-vision", encoder, "--ip-scale", "nan"], "--ip-scale nan"),
        (["--ip-adapters-dir", str(root)], "--ip-adapters-dir is where --from-png looks up"),
        (["--clip-vision-dir", str(root)], "--clip-vision-dir is where --from-png looks up"),
        # a file that is not an IP-Adapter: the loader's line (after the model loads)
        (["--ip-adapter", cat, "--ip-image", cat, "--clip-vision", encoder], "cat.png"),
    ]
    for extra, message in cases:
        err = _refused(capsys, *run, *extra)
        assert message in err, (extra, err)
    assert not (tmp_path / "o.png").exists()


def test_from_png_of_other_records(kit, tmp_path, capsys):
    """An A1111 image whose ControlNet extension ran an IP-Adapter, a record sdengine cannot run, a PNG without
    IP-Adapters given the look-up folders: one line each."""
    folder, _, root = kit
    png = tmp_path / "a1111.png"
    a1111 = (
        'p\nSteps: 4, Sampler: Euler, Seed: 1, Size: 32x32, ControlNet 0: "Module: ip-adapter_clip_sd15, Model: '
        "ip-adapter_sd15 [6a3f6166], Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, Guidance Start: "
        '0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"'
    )
    save_png(picture(SIZE, SIZE), png, a1111)
    err = _refused(capsys, "--from-png", str(png), "--model", str(folder), "--out", str(tmp_path / "o.png"))
    assert "ran IP-Adapter 'ip-adapter_sd15' through A1111's ControlNet extension" in err

    plain = tmp_path / "plain.png"
    save_png(picture(SIZE, SIZE), plain, "p\nSteps: 4, Sampler: Euler, Seed: 1, Size: 32x32")
    err = _refused(capsys, "--from-png", str(plain), "--model", str(folder), "--ip-adapters-dir", str(root))
    assert f"--ip-adapters-dir has no effect: {plain} records no IP-Adapter" in err


def test_from_png_runs_a_window_layer_weights_and_scaling_again(kit, tmp_path, capsys):
    """A unit with a window of the steps, a weight per layer and K+V scaling (what ComfyUI's IPAdapter nodes make)
    writes them all, and --from-png makes the same image (they were once not written, and dropped silently)."""
    folder, pipe, root = kit
    adapter, encoder = root / "adapters" / "ip-adapter_tiny.safetensors", root / "encoders" / "image_encoder"
    weights = tuple(0.25 * (i % 5) for i in range(len(cross_attention_layers(pipe.unet))))
    unit = IPAdapterUnit(
        str(adapter),
        scale=0.9,
        images=str(root / "cat.png"),
        clip_vision=str(encoder),
        start=0.0,
        end=0.6,
        layer_scales=weights,
        scaling="kv",
    )
    r = pipe(PROMPT, NEGATIVE, ip_adapters=[unit], **CALL)
    (rec,) = recorded_ip_adapters(parse_parameters(r.infotexts[0]))
    assert (rec.start, rec.end, rec.layer_scales, rec.scaling) == (0.0, 0.6, weights, "kv")
    made = tmp_path / "made.png"
    save_png(r.images[0], made, r.infotexts[0])
    plain = np.asarray(
        pipe(PROMPT, NEGATIVE, ip_adapters=[dataclasses.replace(unit, layer_scales=None)], **CALL).images[0]
    )
    assert not np.array_equal(plain, np.asarray(r.images[0]))  # the layer weights count
    again = tmp_path / "again.png"
    dirs = ["--ip-adapters-dir", str(root / "adapters"), "--clip-vision-dir", str(root / "encoders")]
    rc = _generate(
        "--from-png", str(made), "--model", str(folder), "--ip-image", str(root / "cat.png"), *dirs, "--out", str(again)
    )
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(_pixels(again), np.asarray(r.images[0]))


def test_split_images_keeps_a_file_with_a_plus(tmp_path):
    """A picture whose own name has a + is that one picture; joined with others, its name is split (one line)."""
    from sdengine.commands.generate_ip import split_images

    picture(8, 8).save(tmp_path / "a+b.png")
    picture(8, 8).save(tmp_path / "c.png")
    assert split_images(str(tmp_path / "a+b.png")) == [str(tmp_path / "a+b.png")]
    assert split_images(f"{tmp_path / 'c.png'}+{tmp_path / 'c.png'}") == [str(tmp_path / "c.png")] * 2
    with pytest.raises(SdengineError, match=r"--ip-image .*a: no such file"):
        split_images(f"{tmp_path / 'c.png'}+{tmp_path / 'a+b.png'}")
