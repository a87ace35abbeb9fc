"""``sdengine generate``: PNGs with A1111 parameters, ``--from-png`` regenerates pixel for pixel, errors are one
line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

pytest.importorskip("diffusers")

from _pipeline_models import mask_picture, picture  # noqa: E402
from sdengine.cli import main  # noqa: E402

# A1111's own reader (modules/infotext_utils.py, parse_generation_parameters), as another tool would run it.
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(text: str) -> dict[str, str]:
    res: dict[str, str] = {}
    prompt, negative, done_prompt = "", "", False
    *lines, last = text.strip().split("\n")
    if len(_A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_prompt = True
            line = line[16:].strip()
        if done_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in _A1111_PARAM.findall(last):
        if v[:1] == '"' and v[-1:] == '"':
            import json

            v = json.loads(v)
        res[k] = v
    return res


@pytest.fixture(scope="module")
def model(tiny_sd1_folder):
    return tiny_sd1_folder


def _generate(*args: str) -> int:
    return main(["generate", *args, "--no-progress"])


def test_generate_writes_pngs_with_a1111_parameters(model, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _generate(
        "a red (apple:1.2), on a table",
        "--model",
        str(model),
        "--negative",
        "blurry",
        "--steps",
        "3",
        "--sampler",
        "euler_a",
        "--seed",
        "5",
        "--width",
        "32",
        "--height",
        "32",
        "--batch",
        "2",
        "--cfg",
        "6",
        "--out",
        str(out),
    )
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-5.png", "00001-6.png"]
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    with Image.open(files[1]) as im:
        text = im.info["parameters"]
        assert im.size == (32, 32)
    p = a1111_parse(text)
    assert p["Prompt"] == "a red (apple:1.2), on a table" and p["Negative prompt"] == "blurry"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"]) == ("3", "Euler a", "6", "6", "32x32")
    assert p["Model"] == "tiny-sd" and len(p["Model hash"]) == 10 and p["Version"].startswith("sdengine ")

    # the next run numbers on
    assert (
        _generate(
            "x",
            "--model",
            str(model),
            "--steps",
            "1",
            "--seed",
            "9",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            str(out),
        )
        == 0
    )
    assert (out / "00002-9.png").is_file()


def test_from_png_reproduces_pixel_for_pixel(model, tmp_path):
    out = tmp_path / "a"
    assert (
        _generate(
            "a blue (bird:1.3) BREAK sky",
            "--model",
            str(model),
            "--negative",
            "ugly",
            "--steps",
            "4",
            "--sampler",
            "DPM++ 2M",
            "--schedule",
            "karras",
            "--seed",
            "11",
            "--batch",
            "2",
            "--width",
            "32",
            "--height",
            "40",
            "--clip-skip",
            "2",
            "--out",
            str(out),
        )
        == 0
    )
    second = out / "00001-12.png"
    again = tmp_path / "b"
    assert _generate("--from-png", str(second), "--model", str(model), "--out", str(again)) == 0
    made = again / "00000-12.png"
    a, b = np.asarray(Image.open(second)), np.asarray(Image.open(made))
    assert a.shape == (40, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert Image.open(second).info["parameters"] == Image.open(made).info["parameters"]


def test_from_png_img2img_and_inpaint_need_the_init_image(model, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    picture(32, 32).save(init)
    mask_picture(32, 32).save(mask)
    out = tmp_path / "a"
    assert (
        _generate(
            "a cat",
            "--model",
            str(model),
            "--steps",
            "6",
            "--sampler",
            "euler",
            "--seed",
            "3",
            "--init-image",
            str(init),
            "--mask",
            str(mask),
            "--strength",
            "0.5",
            "--out",
            str(out),
        )
        == 0
    )
    png = out / "00000-3.png"
    assert "Denoising strength: 0.5" in Image.open(png).info["parameters"]
    assert _generate("--from-png", str(png), "--model", str(model), "--out", str(tmp_path / "b")) == 2
    assert (
        _generate(
            "--from-png",
            str(png),
            "--model",
            str(model),
            "--init-image",
            str(init),
            "--mask",
            str(mask),
            "--out",
            str(tmp_path / "c"),
        )
        == 0
    )
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "c" / "00000-3.png")))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "100"], "width 100 is not a multiple of 8; the nearest valid width is 104"),
        (["--strength", "1.5", "--init-image", "{init}"], "strength must be in (0, 1]"),
        (["--cfg", "-2"], "cfg_scale must be a number >= 0"),
        (["--init-image", "{missing}"], "init image not found"),
        (["--sampler", "DPM++ 9M"], "unknown sampler 'DPM++ 9M'"),
    ],
)
def test_user_errors_are_one_line(model, tmp_path, capsys, args, message):
    picture(32, 32).save(tmp_path / "init.png")
    args = [a.format(init=tmp_path / "init.png", missing=tmp_path / "missing.png") for a in args]
    rc = _generate(
        "x",
        "--model",
        str(model),
        "--steps",
        "4",
        "--width",
        "32",
        "--height",
        "32",
        *args,
        "--out",
        str(tmp_path / "o"),
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("sdengine: error: ") and message in err[0], err


# A1111 v1.10's infotext of a hires-fix txt2img (its "Denoising strength" is the hires pass's), made with an
# upscaler sdengine does not have (the latent and Lanczos ones it runs: tests/test_hires.py; ESRGAN models of
# --upscalers-dir: tests/test_esrgan.py).
A1111_HIRES = (
    "a red apple\nNegative prompt: blurry\nSteps: 6, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, "
    "Seed: 3, Size: 32x32, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, "
    "Hires upscale: 2, Hires steps: 10, Hires upscaler: SwinIR 4x, Version: v1.10.1"
)


def test_from_png_of_a_hires_fix_image_with_a_model_upscaler_names_it(model, tmp_path, capsys):
    from sdengine.metadata import save_png

    png = save_png(Image.new("RGB", (64, 64)), tmp_path / "hires.png", A1111_HIRES)
    init = tmp_path / "init.png"
    picture(32, 32).save(init)
    for extra in ([], ["--init-image", str(init)]):  # an init image does not make it an img2img
        assert _generate("--from-png", str(png), "--model", str(model), "--out", str(tmp_path / "o"), *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "hires fix" in err and "img2img" not in err, err
        assert "'SwinIR 4x', which sdengine does not have" in err and str(png) in err
    assert not (tmp_path / "o").exists()
    # an ESRGAN model's name is kept: without --upscalers-dir, one line naming the flag
    esrgan = save_png(
        Image.new("RGB", (64, 64)), tmp_path / "esrgan.png", A1111_HIRES.replace("SwinIR 4x", "R-ESRGAN 4x+")
    )
    assert _generate("--from-png", str(esrgan), "--model", str(model), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'R-ESRGAN 4x+'" in err and "--upscalers-dir" in err, err
    assert not (tmp_path / "o").exists()


def test_from_png_without_parameters_and_missing_prompt(model, tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert _generate("--from-png", str(plain), "--model", str(model)) == 2
    assert "has no 'parameters' text" in capsys.readouterr().err
    assert _generate("--model", str(model)) == 2
    assert "give a PROMPT" in capsys.readouterr().err


def test_mask_resize_is_said_on_stderr(model, tmp_path, capsys):
    picture(32, 32).save(tmp_path / "init.png")
    mask_picture(20, 24).save(tmp_path / "mask.png")
    assert (
        _generate(
            "x",
            "--model",
            str(model),
            "--steps",
            "2",
            "--sampler",
            "euler",
            "--init-image",
            str(tmp_path / "init.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "--out",
            str(tmp_path / "o"),
        )
        == 0
    )
    assert "sdengine: WARNING: mask 20x24 resized to 32x32" in capsys.readouterr().err


def test_out_with_an_image_suffix_is_the_file(model, tmp_path, capsys):
    ghost = tmp_path / "sub" / "ghost.png"
    assert (
        _generate(
            "x",
            "--model",
            str(model),
            "--steps",
            "1",
            "--seed",
            "4",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            str(ghost),
        )
        == 0
    )
    assert ghost.is_file() and capsys.readouterr().out.split() == [str(ghost)]
    with Image.open(ghost) as im:
        assert "Seed: 4" in im.info["parameters"]


@pytest.mark.parametrize(
    "out,extra,message",
    [
        ("ghost.png", ["--batch", "2"], "names one file but --batch 2 makes 2 images"),
        ("ghost.jpg", [], "sdengine writes PNG files"),
        ("blocker.txt/sub", [], "blocker.txt is a file"),
        ("blocker.txt", [], "blocker.txt is a file"),
    ],
)
def test_out_is_checked_before_generating(model, tmp_path, capsys, monkeypatch, out, extra, message):
    import sdengine.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(sdengine.pipeline, "load_pipeline", refuse)
    (tmp_path / "blocker.txt").write_text("x")
    rc = _generate("x", "--model", str(model), "--steps", "1", *extra, "--out", str(tmp_path / out))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker.txt"]


def test_from_png_reads_back_mask_blur_and_cfg_rescale(model, tmp_path, capsys):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    picture(32, 32).save(init)
    mask_picture(32, 32).save(mask)
    png = tmp_path / "a.png"
    assert (
        _generate(
            "a cat",
            "--model",
            str(model),
            "--steps",
            "4",
            "--sampler",
            "euler",
            "--seed",
            "3",
            "--init-image",
            str(init),
            "--mask",
            str(mask),
            "--strength",
            "0.6",
            "--mask-blur",
            "3",
            "--guidance-rescale",
            "0.5",
            "--out",
            str(png),
        )
        == 0
    )
    assert "Mask blur: 3" in Image.open(png).info["parameters"]
    capsys.readouterr()
    again = tmp_path / "b.png"
    assert (
        _generate(
            "--from-png",
            str(png),
            "--model",
            str(model),
            "--init-image",
            str(init),
            "--mask",
            str(mask),
            "--out",
            str(again),
        )
        == 0
    )
    assert "not reproduced" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
    assert Image.open(png).info["parameters"] == Image.open(again).info["parameters"]
    # without --mask it would silently be img2img (another image, the blur dropped): one line instead
    rc = _generate(
        "--from-png", str(png), "--model", str(model), "--init-image", str(init), "--out", str(tmp_path / "c")
    )
    err = capsys.readouterr().err
    assert rc == 2 and "is an inpainting image (Mask blur 3): give the same --init-image and --mask" in err, err
    assert not (tmp_path / "c").exists()


def test_help_defaults_are_the_requests():
    from sdengine.commands.generate import HELP_DEFAULTS, request_defaults
    from sdengine.pipeline import GenerationRequest

    want = GenerationRequest.defaults()
    assert HELP_DEFAULTS == {k: want[k] for k in HELP_DEFAULTS}
    assert request_defaults()["schedule"] == want["schedule"] and request_defaults()["seed"] == -1


def test_subseed_help_states_that_every_image_keeps_the_seed(capsys):
    """With variation seeds every row keeps the seed and takes subseed + i (A1111's rule, the code's
    GenerationRequest.seeds / subseeds); the help once said image i used seed+i's noise."""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = text.split("options:", 1)[1]  # past the usage lines
    subseed_help = options.split("--subseed N", 1)[1].split("--subseed-strength", 1)[0]
    assert "keeps --seed's noise" in subseed_help and "seed+i" not in subseed_help, subseed_help


def test_grid_writes_the_batch_as_one_picture(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        _generate(
            "a cat",
            "--model",
            str(model),
            "--steps",
            "2",
            "--seed",
            "3",
            "--width",
            "32",
            "--height",
            "32",
            "--batch",
            "3",
            "--grid",
            "--out",
            str(out),
        )
        == 0
    )
    printed = capsys.readouterr().out.split()
    grid = out / "grid-00000.png"
    assert printed[-1] == str(grid)
    with Image.open(grid) as im:
        g = np.asarray(im.convert("RGB"))
        text = im.info["parameters"]
    assert g.shape == (64, 64, 3)  # 3 images -> 2 columns, 2 rows of 32 px
    for i, name in enumerate(["00000-3.png", "00001-4.png", "00002-5.png"]):
        cell = g[(i // 2) * 32 : (i // 2 + 1) * 32, (i % 2) * 32 : (i % 2 + 1) * 32]
        np.testing.assert_array_equal(cell, np.asarray(Image.open(out / name).convert("RGB")))
    assert not g[32:, 32:].any()  # the empty place is black
    assert text == Image.open(out / "00000-3.png").info["parameters"]
    # a one-file --out has no room for a grid
    assert _generate("a cat", "--model", str(model), "--grid", "--out", str(tmp_path / "one.png")) == 2
    assert "--grid" in capsys.readouterr().err


_CONTROLNET_PNG: list[Path] = []


def _controlnet_png(tmp_path):
    """(edges.png, a PNG made with a canny ControlNet from it) in ``tmp_path``: made once per module and copied,
    since several tests start from the same image."""
    import shutil

    if not _CONTROLNET_PNG:
        first = tmp_path.parent / "controlnet-png"  # in the session's base temporary folder
        first.mkdir()
        _CONTROLNET_PNG.extend(_make_controlnet_png(first))
    edges, made = tmp_path / "edges.png", tmp_path / "cn" / "00000-4.png"
    made.parent.mkdir()
    shutil.copyfile(_CONTROLNET_PNG[0], edges)
    shutil.copyfile(_CONTROLNET_PNG[1], made)
    return edges, made


def _make_controlnet_png(tmp_path):
    edges = tmp_path / "edges.png"
    picture(64, 64).save(edges)
    out = tmp_path / "cn"
    assert (
        _generate(
            "a smiling face",
            "--steps",
            "2",
            "--seed",
            "4",
            "--control",
            f"canny:{edges}:0.8",
            "--controlnet",
            "emoji-controlnet-canny",
            "--out",
            str(out),
        )
        == 0
    )
    return edges, out / "00000-4.png"


def test_from_png_of_a_controlnet_image_reuses_the_controlnet_by_name(tmp_path, capsys):
    edges, made = _controlnet_png(tmp_path)
    text = Image.open(made).info["parameters"]
    assert "ControlNet 0" in text and "emoji-controlnet-canny" in text
    capsys.readouterr()
    # without the control image: refused in one line (as an img2img PNG without its init image)
    assert _generate("--from-png", str(made), "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "emoji-controlnet-canny" in err[0] and "--control" in err[0], err
    assert not (tmp_path / "x").exists()
    # with it: the ControlNet is found by name, the recorded weight 0.8 is used, the image is the same
    again = tmp_path / "again"
    assert _generate("--from-png", str(made), "--control", f"canny:{edges}", "--out", str(again)) == 0
    assert "not reproduced" not in capsys.readouterr().err
    redo = again / "00000-4.png"
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(redo)))
    assert Image.open(redo).info["parameters"] == text


def test_from_png_reads_the_controlnet_step_rule(tmp_path, capsys):
    from sdengine.metadata import save_png

    edges, made = _controlnet_png(tmp_path)
    text = Image.open(made).info["parameters"]
    assert "Guidance End: 1" in text and "ControlNet step rule" not in text  # diffusers' rule: not written
    # an image of the A1111 API (the extension's rule, step i when start <= i/steps <= end): end 0.6 of 2 steps
    # controls both steps there, only the first by diffusers' rule
    ends = text.replace("Guidance End: 1", "Guidance End: 0.6")
    made_by = {"a1111": ends + ", ControlNet step rule: a1111", "diffusers": ends}
    images = {}
    for rule, infotext in made_by.items():
        png = tmp_path / f"{rule}.png"
        save_png(Image.open(made), png, infotext)
        assert _generate("--from-png", str(png), "--control", f"canny:{edges}", "--out", str(tmp_path / rule)) == 0
        with Image.open(tmp_path / rule / "00000-4.png") as im:
            images[rule] = np.asarray(im.convert("RGB")).astype(int)
            assert ("ControlNet step rule: a1111" in im.info["parameters"]) == (rule == "a1111")
    assert np.abs(images["a1111"] - images["diffusers"]).max() > 0
    capsys.readouterr()
    # a rule list that does not match the ControlNets: one line, nothing written
    bad = tmp_path / "bad.png"
    save_png(Image.open(made), bad, ends + ', ControlNet step rule: "a1111,diffusers"')
    assert _generate("--from-png", str(bad), "--control", f"canny:{edges}", "--out", str(tmp_path / "b")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ControlNet step rule" in err[0], err
    assert not (tmp_path / "b").exists()


def test_from_png_controlnet_by_folder_and_hash(tmp_path, capsys):
    import shutil

    from sdengine.catalog import builtin_path
    from sdengine.metadata import legacy_hash, model_hash

    edges, made = _controlnet_png(tmp_path)
    text = Image.open(made).info["parameters"]
    # an A1111-style record: a name that is not built-in, with a hash in brackets, found in --controlnets-dir
    folder = tmp_path / "cns"
    shutil.copytree(builtin_path("controlnets", "emoji-controlnet-canny"), folder / "mycanny")
    weights = sorted((folder / "mycanny").glob("**/diffusion_pytorch_model*.safetensors"))[0]
    good = model_hash(weights)[:8]
    # sd-webui-controlnet writes A1111's old hash (SHA-256 of the 64 KiB at 1 MiB): found too (it was refused)
    old = legacy_hash(weights)
    assert weights.stat().st_size > 0x110000 and old != good
    bad = next(d for d in ("0123abcd", "ffffffff") if d not in (good, old))
    for digest, ok in ((old, True), (good, True), (bad, False)):
        png = tmp_path / f"a1111-{ok}.png"
        from sdengine.metadata import save_png

        save_png(Image.open(made), png, text.replace("Model: emoji-controlnet-canny", f"Model: mycanny [{digest}]"))
        capsys.readouterr()
        rc = _generate(
            "--from-png",
            str(png),
            "--control",
            f"canny:{edges}",
            "--controlnets-dir",
            str(folder),
            "--out",
            str(tmp_path / f"o-{ok}"),
        )
        err = capsys.readouterr().err
        if ok:
            assert rc == 0, err
            np.testing.assert_array_equal(
                np.asarray(Image.open(made)), np.asarray(Image.open(tmp_path / "o-True" / "00000-4.png"))
            )
        else:
            assert rc == 2 and f"has hash [{good}] (A1111 old hash [{old}])" in err and "mycanny" in err, err
    # a name found nowhere
    assert (
        _generate(
            "--from-png", str(tmp_path / "a1111-True.png"), "--control", f"canny:{edges}", "--out", str(tmp_path / "o3")
        )
        == 2
    )
    assert "'mycanny', which is not built-in" in capsys.readouterr().err


def test_resize_mode_and_size_notes_on_stderr(model, tmp_path, capsys):
    init = tmp_path / "init.png"
    picture(96, 64).save(init)
    assert (
        _generate(
            "x",
            "--model",
            str(model),
            "--steps",
            "2",
            "--seed",
            "1",
            "--init-image",
            str(init),
            "--strength",
            "0.5",
            "--resize-mode",
            "crop and resize",
            "--out",
            str(tmp_path / "o"),
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "init image 96x64 fitted to 32x32 (crop and resize)" in err
    assert (
        _generate(
            "x", "--model", str(model), "--steps", "1", "--width", "64", "--height", "64", "--out", str(tmp_path / "o")
        )
        == 0
    )
    assert "64x64 is not the model's training size 32x32" in capsys.readouterr().err
    assert (
        _generate(
            "x",
            "--model",
            str(model),
            "--steps",
            "2",
            "--init-image",
            str(init),
            "--resize-mode",
            "zoom",
            "--out",
            str(tmp_path / "o"),
        )
        == 2
    )
    assert "unknown resize mode 'zoom'" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["--lora", "tag"])
@pytest.mark.parametrize("weight", ["1e30", "-1e30", "500", "inf"])
def test_absurd_lora_weight_is_one_line_before_generating(model, tmp_path, capsys, how, weight):
    import torch

    from sdengine.weights import save_safetensors

    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_safetensors(
        {
            f"{layer}.lora_down.weight": torch.ones(2, 32),
            f"{layer}.lora_up.weight": torch.ones(32, 2),
            f"{layer}.alpha": torch.tensor(2.0),
        },
        tmp_path / "styl.safetensors",
    )
    extra = (
        ["x", "--lora", f"{tmp_path / 'styl.safetensors'}:{weight}"]
        if how == "--lora"
        else [f"x <lora:styl:{weight}>", "--lora-dir", str(tmp_path)]
    )
    rc = _generate(
        *extra, "--model", str(model), "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "o")
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and re.search(r"styl: weight .*(outside \[-100, 100\]|not finite)", err[0]), err
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_control_image_of_another_size_is_said(tmp_path, capsys):
    edges = tmp_path / "edges.png"
    picture(96, 64).save(edges)
    assert (
        _generate(
            "a face",
            "--steps",
            "1",
            "--seed",
            "1",
            "--control",
            f"canny:{edges}",
            "--controlnet",
            "emoji-controlnet-canny",
            "--resize-mode",
            "fill",
            "--out",
            str(tmp_path / "o"),
        )
        == 0
    )
    assert "control image 0 96x64 fitted to 64x64 (resize and fill)" in capsys.readouterr().err


def test_a_large_lora_weight_is_said_once_on_the_command_line(tmp_path):
    """The library logs a weight outside [-4, 4] and warns Python callers (LoRAWeightWarning); the command line
    showed both, the second with a source line. Now one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    argv = ["generate", "an apple", "--lora", "emoji-fruit:5", "--steps", "1", "--out", str(tmp_path / "a.png")]
    r = subprocess.run(
        [sys.executable, "-m", "sdengine", "--threads", "1", *argv, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    said = [line for line in r.stderr.splitlines() if "images may break down" in line]
    assert len(said) == 1 and "weight 5 is outside [-4, 4]" in said[0], r.stderr
    assert "LoRAWeightWarning" not in r.stderr and (tmp_path / "a.png").is_file()


def test_from_png_reproduces_resize_mode_and_a_prediction_type_override(model, tmp_path, capsys):
    """Settings A1111 does not write but that change the image are written as sdengine's own fields and read
    back: the resize mode of an init image of another size, and a --prediction-type override (both once made
    --from-png silently draw another image)."""
    init = tmp_path / "init.png"
    picture(40, 24).save(init)
    png, again = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", str(model), "--steps", "3", "--sampler", "euler", "--width", "32", "--height", "32"]
    made = _generate(
        "a cat", *common, "--seed", "4", "--init-image", str(init), "--strength", "0.6", "--resize-mode", "crop",
        "--prediction-type", "v_prediction", "--out", str(png),
    )  # fmt: skip
    assert made == 0
    text = Image.open(png).info["parameters"]
    assert "Resize mode: crop and resize" in text and "Prediction type: v_prediction" in text, text
    capsys.readouterr()
    assert _generate("--from-png", str(png), "--model", str(model), "--init-image", str(init), "--out", str(again)) == 0
    assert "not reproduced" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
    assert Image.open(again).info["parameters"] == text
    # a plain image writes neither field
    plain = tmp_path / "c.png"
    assert _generate("a cat", *common, "--seed", "4", "--out", str(plain)) == 0
    text = Image.open(plain).info["parameters"]
    assert "Resize mode" not in text and "Prediction type" not in text and "Sampler options" not in text


def test_prompt_list_never_skips_or_replaces_another_image_of_the_same_name(model, tmp_path, capsys):
    """`generate "a red car" --seed 0` and `generate --prompts list.txt` both default to one folder and name
    their files NNNNN-SEED.png: the list's line 1 (seed 0) is 00000-0.png too. That file is another image, so the
    list stops before any work (it once counted the line as done and never made it; a line making several images
    rendered over a file of another prompt); its own finished lines are still skipped on a second run."""
    out = tmp_path / "out"
    assert _generate("a red car", "--model", str(model), "--steps", "1", "--seed", "0", "--out", str(out)) == 0
    car = (out / "00000-0.png").read_bytes()
    prompts = tmp_path / "list.txt"
    prompts.write_text("a cat\n")
    capsys.readouterr()
    assert _generate("--prompts", str(prompts), "--model", str(model), "--steps", "1", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "list.txt:1: " in err[0] and "00000-0.png exists and is not this line's image" in err[0]
    assert "'a red car'" in err[0]
    assert (out / "00000-0.png").read_bytes() == car and sorted(p.name for p in out.iterdir()) == ["00000-0.png"]

    # a line of two images, one of whose names is taken by another prompt's image: refused, the file kept
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"prompt": "a cat", "batch_size": 2, "seed": 0}\n')
    (out / "00000-0.png").rename(out / "00000-1-1.png")
    assert _generate("--prompts", str(batch), "--model", str(model), "--steps", "1", "--out", str(out)) == 2
    assert "00000-1-1.png exists and is not this line's image" in capsys.readouterr().err
    assert (out / "00000-1-1.png").read_bytes() == car and not (out / "00000-0-0.png").exists()

    # the list's own images are recognised (the prompt's outer spaces are not in the infotext): skipped
    mine = tmp_path / "mine"
    lora_list = tmp_path / "lora.txt"
    lora_list.write_text("a dog \n")
    for _ in range(2):
        assert _generate("--prompts", str(lora_list), "--model", str(model), "--steps", "1", "--out", str(mine)) == 0
    assert "0 image(s) written, 1 line(s) already done" in capsys.readouterr().err


def test_prompt_list_with_a_byte_order_mark(model, tmp_path, capsys):
    """A list saved by Windows Notepad starts with a UTF-8 byte-order mark: it is not part of the first prompt
    (it was: an invisible character in the prompt and the infotext), and a .jsonl's first line is JSON."""
    from sdengine.metadata import parse_parameters, read_png_parameters

    text = tmp_path / "list.txt"
    text.write_bytes("\ufeffa cat\n".encode())
    lines = tmp_path / "list.jsonl"
    lines.write_bytes('\ufeff{"prompt": "a dog", "seed": 5}\n'.encode())
    for src, name in ((text, "00000-0.png"), (lines, "00000-5.png")):
        out = tmp_path / src.suffix[1:]
        assert _generate("--prompts", str(src), "--model", str(model), "--steps", "1", "--out", str(out)) == 0, (
            capsys.readouterr().err
        )
        prompt = parse_parameters(read_png_parameters(out / name) or "")["Prompt"]
        assert prompt == ("a cat" if src is text else "a dog")


def test_out_edge_cases_are_checked_before_generating(model, tmp_path, capsys, monkeypatch):
    """An empty --out (it wrote into the current folder), a folder no file can be made in (it failed after the
    render, with the temporary file's name), and `--out shots.png/`, a folder by its slash (it wrote a file)."""
    import sdengine.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    with monkeypatch.context() as m:
        m.setattr(sdengine.pipeline, "load_pipeline", refuse)
        cases = [("", "--out is empty")]
        if Path("/proc").is_dir():  # Linux: a file system that takes no new files, even from root
            cases.append(("/proc/sdengine-out/x.png", "cannot write in /proc"))
        for out, message in cases:
            rc = _generate("x", "--model", str(model), "--steps", "1", "--out", out)
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1 and message in err[0], err
    rc = _generate("x", "--model", str(model), "--steps", "1", "--seed", "3", "--out", f"{tmp_path / 'shots.png'}/")
    assert rc == 0 and (tmp_path / "shots.png").is_dir()
    assert [p.name for p in (tmp_path / "shots.png").iterdir()] == ["00000-3.png"]


def test_grid_numbers_never_reuse_an_existing_grid(model, tmp_path, capsys):
    """The next number of a folder counts grid-NNNNN.png (and xyz-NNNNN.png) too: a folder whose images were
    moved away but whose grid-00000.png stayed got a new grid-00000.png over it."""
    out = tmp_path / "out"
    args = ["x", "--model", str(model), "--steps", "1", "--batch", "2", "--grid", "--out", str(out)]
    assert _generate(*args, "--seed", "1") == 0
    first = (out / "grid-00000.png").read_bytes()
    for p in out.glob("0*.png"):
        p.unlink()
    (out / "xyz-00004.png").write_bytes(first)  # an X/Y/Z grid's number is taken too
    assert _generate(*args, "--seed", "7") == 0
    assert (out / "grid-00000.png").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == [
        "00005-7.png",
        "00006-8.png",
        "grid-00000.png",
        "grid-00005.png",
        "xyz-00004.png",
    ]

    # past 99999 the numbers grow a digit and are still counted (100000-SEED.png was written over and over)
    many = tmp_path / "many"
    many.mkdir()
    (many / "99999-1.png").write_bytes(first)
    for _ in range(2):
        assert _generate("x", "--model", str(model), "--steps", "1", "--seed", "4", "--out", str(many)) == 0
    assert sorted(p.name for p in many.iterdir()) == ["100000-4.png", "100001-4.png", "99999-1.png"]


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_from_png_of_an_a1111_jpeg_or_webp(model, tmp_path, capsys, fmt):
    """A1111 saves JPEG and WebP images with their parameters in the EXIF UserComment; `sdengine pnginfo` read
    them but `generate --from-png` said "has no 'parameters' text: it was not written by sdengine or A1111". It
    now makes the image those parameters describe, as from a PNG with the same text."""
    from sdengine.image_info import EXIF_IFD, USER_COMMENT, encode_user_comment

    text = "a cat\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 6, Seed: 12, Size: 32x32"
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = encode_user_comment(text)
    src = tmp_path / f"a1111.{fmt.lower()}"
    Image.new("RGB", (32, 32)).save(src, format=fmt, exif=exif.tobytes())
    png = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32)).save(png, pnginfo=info)
    for f, out in ((src, "from_exif.png"), (png, "from_png.png")):
        assert _generate("--from-png", str(f), "--model", str(model), "--out", str(tmp_path / out)) == 0, (
            capsys.readouterr().err
        )
    a, b = Image.open(tmp_path / "from_exif.png"), Image.open(tmp_path / "from_png.png")
    assert a.info["parameters"] == b.info["parameters"] and "Seed: 12" in a.info["parameters"]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_n_iter_makes_batches_one_after_another_with_continuing_seeds(model, tmp_path, capsys):
    """A1111's batch count (`--n-iter`, `--batch-count`) beside its batch size (`--batch-size`, `--batch`): the
    batches run one after another and continue one run's seeds (batch k from seed + k * batch; with variation
    seeds, every image keeps the seed and batch k starts at subseed + k * batch), numbered on, and `--grid` holds
    them all: the images `--batch 4` makes. There was no such flag (`--n-iter 3` was "unrecognized arguments")."""
    common = ["a cat", "--model", str(model), "--steps", "1", "--seed", "10"]
    sub = ["--subseed", "40", "--subseed-strength", "0.3"]
    for extra, names in [
        ([], ["00000-10.png", "00001-11.png", "00002-12.png", "00003-13.png"]),
        (sub, ["00000-10.png", "00001-10.png", "00002-10.png", "00003-10.png"]),
    ]:
        out, one = tmp_path / f"iter{len(extra)}", tmp_path / f"one{len(extra)}"
        assert _generate(*common, *extra, "--batch-size", "2", "--n-iter", "2", "--grid", "--out", str(out)) == 0
        assert sorted(p.name for p in out.iterdir()) == [*names, "grid-00000.png"]
        assert "4 image(s)" in capsys.readouterr().err
        assert _generate(*common, *extra, "--batch", "4", "--out", str(one)) == 0
        for name in names:
            a, b = Image.open(out / name), Image.open(one / name)
            assert a.info["parameters"] == b.info["parameters"]  # the seeds continue across the batches
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
        assert Image.open(out / "grid-00000.png").size == (2 * 32, 2 * 32)
    assert "Variation seed: 43," in Image.open(tmp_path / "iter4" / "00003-10.png").info["parameters"]
    # a random seed is drawn once: the second batch continues it
    rnd = tmp_path / "rnd"
    assert _generate("a cat", "--model", str(model), "--steps", "1", "--n-iter", "2", "--out", str(rnd)) == 0
    seeds = sorted(int(p.stem.split("-")[1]) for p in rnd.iterdir())
    assert seeds[1] == seeds[0] + 1
    for args, message in [
        (["--n-iter", "0", "--out", str(tmp_path / "zero")], "--n-iter must be a positive number"),
        (["--n-iter", "2", "--out", str(tmp_path / "one.png")], "--batch 1 x --n-iter 2 makes 2 images"),
        (["--n-iter", "2", "--seed", str(2**64 - 1), "--out", str(tmp_path / "late")], "seed"),
    ]:
        capsys.readouterr()
        assert _generate("a cat", "--model", str(model), "--steps", "1", *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_out_that_is_an_input_of_the_run_is_refused(model, tmp_path, capsys, monkeypatch):
    """`--init-image photo.png --out photo.png` replaced the photo the run started from with the new image (and
    `--from-png a.png --out a.png` with other flags the original); refused before the model loads, as ffmpeg
    refuses an output that is its input. Each input file is kept byte for byte."""
    import sdengine.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(sdengine.pipeline, "load_pipeline", refuse)
    photo, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    picture(32, 32).save(photo)
    mask_picture(32, 32).save(mask)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Sampler: Euler, CFG scale: 6, Seed: 12, Size: 32x32")
    made = tmp_path / "made.png"
    Image.new("RGB", (32, 32)).save(made, pnginfo=info)
    before = {p: p.read_bytes() for p in (photo, mask, made)}
    for args, flag in [
        (["x", "--init-image", str(photo), "--out", str(photo)], "--init-image"),
        (["x", "--init-image", str(photo), "--mask", str(mask), "--out", f"{tmp_path}/./mask.png"], "--mask"),
        (["--from-png", str(made), "--steps", "3", "--out", str(made)], "--from-png"),
        (["x", "--control", f"canny:{photo}:0.5", "--controlnet", "c", "--out", str(photo)], "--control"),
    ]:
        assert _generate(*args, "--model", str(model)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is the {flag} image this run reads" in err[0], err
    assert {p: p.read_bytes() for p in before} == before


def test_prompt_list_reads_a1111_command_line_lines(model, tmp_path, capsys):
    """A1111's "Prompts from file or textbox" lines (`--prompt "a cat" --steps 3 --seed 7 ...`) were taken as the
    prompt text itself (an image of the words "--steps 3", silently); they are read as A1111 reads them, and a
    tag sdengine cannot honour is one line naming FILE:LINE before any work."""
    from sdengine.batch_render import parse_prompt_list

    lines = tmp_path / "a1111.txt"
    lines.write_text(
        '--prompt "a red apple" --negative_prompt blurry ugly --steps 3 --seed 7 --cfg_scale 5 '
        '--sampler_name "euler a"\n'
        "a plain cat\n"
        "--prompt a green pear --width 48 --height 32 --batch_size 2\n"
    )
    items = parse_prompt_list(lines, {"steps": 1})
    assert items[0].settings == {
        "prompt": "a red apple",
        "negative_prompt": "blurry ugly",
        "steps": 3,
        "seed": 7,
        "cfg_scale": 5.0,
        "sampler": "Euler a",
    }
    assert items[1].settings == {"prompt": "a plain cat", "steps": 1, "seed": 1}
    assert (items[2].settings["width"], items[2].settings["batch_size"], items[2].names) == (
        48,
        2,
        ("00002-0-2.png", "00002-1-3.png"),
    )
    out = tmp_path / "out"
    assert _generate("--prompts", str(lines), "--model", str(model), "--steps", "1", "--out", str(out)) == 0
    text = Image.open(out / "00000-7.png").info["parameters"]
    assert text.startswith("a red apple\nNegative prompt: blurry ugly\nSteps: 3, Sampler: Euler a,")
    for bad, message in [
        ("--prompt x --n_iter 3", "a1111.txt:1: --n_iter is not an option"),
        ("--prompt x --steps ten", "a1111.txt:1: --steps 'ten' is not a number"),
        ('--prompt "x', "a1111.txt:1: cannot read the line"),
        ("--prompt x --seed", "a1111.txt:1: --seed has no value"),
    ]:
        lines.write_text(bad + "\n")
        capsys.readouterr()
        assert _generate("--prompts", str(lines), "--model", str(model), "--out", str(tmp_path / "bad")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--strength", "0.5"], "--strength has no effect without --init-image (img2img) or the hires fix"),
        (["--strength-rule", "a1111"], "--strength-rule has no effect without --init-image"),
        (["--vae-encode", "tiny"], "--vae-encode has no effect without --init-image"),
        (["--mask-blur", "4"], "--mask-blur has no effect without --mask or --outpaint"),
        (["--resize-mode", "crop"], "--resize-mode has no effect without --init-image or --control"),
        (["--refiner-switch-at", "0.5"], "--refiner-switch-at has no effect without --refiner"),
        (["--subseed", "7"], "--subseed has no effect without a --subseed-strength above 0"),
        # at scale 1 the guided prediction is the conditional one: the rescale once changed nothing, without a word
        (["--cfg", "1", "--guidance-rescale", "0.7"], "--guidance-rescale has no effect without a --cfg other than 1"),
        (["--lora-dir", "{missing}"], "LoRA folder {missing} does not exist"),
        (["--lora-dir", "{file}"], "LoRA folder {file} is not a folder"),
        # a folder that is there, but no <lora:...> tag in the prompt and no --lora: once never looked at
        (["--lora-dir", "{folder}"], "--lora-dir is where <lora:NAME> tags and --lora names are looked up"),
    ],
)
def test_a_flag_without_effect_or_a_missing_lora_dir_is_refused_before_loading(
    model, tmp_path, capsys, monkeypatch, flags, message
):
    """`--strength 0.5` on a text-to-image run (no init image, no hires fix) was dropped without a word, and a
    `--lora-dir` that no <lora:...> tag used was never looked at: both now one line, before the model loads."""
    import sdengine.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdengine.pipeline, "load_pipeline", refuse)
    (tmp_path / "file.txt").write_text("x")
    names = {"missing": tmp_path / "nope", "file": tmp_path / "file.txt", "folder": tmp_path}
    flags = [f.format(**names) for f in flags]
    rc = _generate("x", "--model", str(model), "--steps", "2", *flags, "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message.format(**names) in err[0], err
    assert not (tmp_path / "o").exists()


def test_strength_is_the_default_of_a_prompt_lists_img2img_lines(model, tmp_path, capsys):
    """`generate --prompts list.jsonl --strength 0.3` dropped the flag (no --init-image on the command line), so
    a line with its own init image ran at 0.75; and a text-to-image line records no strength."""
    import json

    picture(32, 32).save(tmp_path / "init.png")
    listing = tmp_path / "list.jsonl"
    lines = [{"prompt": "a", "init_image": str(tmp_path / "init.png")}, {"prompt": "b"}]
    listing.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "o"
    rc = _generate(
        "--prompts", str(listing), "--model", str(model), "--steps", "4", "--strength", "0.5", "--out", str(out)
    )
    assert rc == 0, capsys.readouterr().err
    first, second = (Image.open(out / name).info["parameters"] for name in ("00000-0.png", "00001-1.png"))
    assert "Denoising strength: 0.5," in first
    assert "Denoising strength" not in second


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "x", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["train", "lora", "--model", "emoji"], "the following arguments are required: --data"),
        (["list", "checkpoints"], "invalid choice: 'checkpoints'"),
    ],
)
def test_argument_parser_mistakes_are_one_line_too(capsys, argv, message):
    """docs/cli.md: mistakes end as one line, `sdengine: error: ...`, exit 2; argparse's own ones printed the
    whole usage first (thirty lines for generate), the error last."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("sdengine: error: ") and message in err, err
    assert (
        f"(see 'sdengine {' '.join(a for a in argv[:2] if a in ('generate', 'train', 'lora', 'list'))} --help')" in err
    )


def test_strength_rule_on_txt2img_ddim_walks_a1111s_grid(model, tmp_path, capsys):
    """``--strength-rule a1111`` on a DDIM text-to-image run: A1111's own DDIM grid (it was refused as a flag
    without effect); the PNG says so and ``--from-png`` makes the same image again."""
    out = tmp_path / "out"
    args = ["a red apple", "--model", str(model), "--steps", "3", "--sampler", "ddim", "--seed", "5"]
    assert _generate(*args, "--width", "32", "--height", "32", "--strength-rule", "a1111", "--out", str(out)) == 0
    made = sorted(out.glob("*.png"))[0]
    text = Image.open(made).info["parameters"]
    assert "Strength rule: a1111" in text
    again = tmp_path / "again"
    assert _generate("--from-png", str(made), "--model", str(model), "--out", str(again)) == 0
    second = sorted(again.glob("*.png"))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(made)))
    assert _generate(*args, "--width", "32", "--height", "32", "--out", str(tmp_path / "plain")) == 0
    plain = sorted((tmp_path / "plain").glob("*.png"))[0]
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(made)))


@pytest.mark.slow
def test_a_controlnet_images_infotext_names_its_preprocessor_and_its_thresholds(tmp_path):
    """As A1111's ControlNet extension writes it: the map came from canny at 100 / 200, which reuse needs."""
    _, made = _controlnet_png(tmp_path)
    text = Image.open(made).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: emoji-controlnet-canny, Weight: 0.8, Threshold A: 100, ' in text
    assert "Threshold B: 200, Guidance Start: 0, Guidance End: 1" in text


@pytest.mark.slow
def test_from_png_preprocesses_the_control_image_with_the_recorded_thresholds_and_processor_res(tmp_path):
    from sdengine.metadata import save_png

    edges, made = _controlnet_png(tmp_path)
    text = Image.open(made).info["parameters"]
    base = np.asarray(Image.open(made).convert("RGB")).astype(int)
    for name, fields in {
        "thresholds": "Threshold A: 5, Threshold B: 10",
        "res": "Processor Res: 16, Threshold A: 100, Threshold B: 200",
    }.items():
        png = tmp_path / f"{name}.png"
        save_png(Image.open(made), png, text.replace("Threshold A: 100, Threshold B: 200", fields))
        assert _generate("--from-png", str(png), "--control", f"canny:{edges}", "--out", str(tmp_path / name)) == 0
        with Image.open(tmp_path / name / "00000-4.png") as im:
            assert fields in im.info["parameters"]  # and written again as it was made
            assert np.abs(np.asarray(im.convert("RGB")).astype(int) - base).max() > 0, name


@pytest.mark.slow
def test_from_png_reproduces_the_extensions_pixel_perfect_and_the_threshold_flags_override(tmp_path):
    """An A1111 unit with Pixel Perfect: the control image (40x24 for the 64x64 output) is scaled to 24 x 64/24 =
    64 before canny, written back as that Processor Res (once: warned of, the recorded 512 used); the
    --control-threshold-a / -b flags replace the recorded thresholds, and are written."""
    from sdengine.metadata import save_png

    _, made = _controlnet_png(tmp_path)
    small = tmp_path / "small.png"
    picture(40, 24).save(small)
    text = Image.open(made).info["parameters"]
    text = text.replace("Threshold A: 100", "Processor Res: 512, Threshold A: 100")
    text = text.replace("Guidance End: 1", "Guidance End: 1, Pixel Perfect: True")
    png = tmp_path / "a1111.png"
    save_png(Image.open(made), png, text)
    assert _generate("--from-png", str(png), "--control", f"canny:{small}", "--out", str(tmp_path / "pp")) == 0
    with Image.open(tmp_path / "pp" / "00000-4.png") as im:
        assert "Processor Res: 64, Threshold A: 100, Threshold B: 200" in im.info["parameters"]
    flags = ("--control-threshold-a", "20", "--control-threshold-b", "60")
    assert _generate("--from-png", str(png), "--control", f"canny:{small}", *flags, "--out", str(tmp_path / "t")) == 0
    with Image.open(tmp_path / "t" / "00000-4.png") as im:
        assert "Processor Res: 64, Threshold A: 20, Threshold B: 60" in im.info["parameters"]


@pytest.mark.slow
def test_from_png_of_an_a1111_controlnet_image_counts_the_guidance_steps_by_a1111s_rule(tmp_path):
    """An infotext A1111 wrote has no sdengine step-rule field: its extension's rule made it, so it is read so."""
    from sdengine.metadata import VERSION, save_png

    edges, made = _controlnet_png(tmp_path)
    text = Image.open(made).info["parameters"].replace("Guidance End: 1", "Guidance End: 0.6")
    a1111 = text.replace(f"Version: {VERSION}", "RNG: CPU, Version: v1.10.1")  # the sdengine image's CPU noise
    assert a1111 != text
    made_by = {"a1111": a1111, "sdengine_a1111_rule": text + ", ControlNet step rule: a1111", "diffusers": text}
    images = {}
    for name, infotext in made_by.items():
        png = tmp_path / f"{name}.png"
        save_png(Image.open(made), png, infotext)
        assert _generate("--from-png", str(png), "--control", f"canny:{edges}", "--out", str(tmp_path / name)) == 0
        with Image.open(tmp_path / name / "00000-4.png") as im:
            images[name] = np.asarray(im.convert("RGB")).astype(int)
            if name == "a1111":
                assert "ControlNet step rule: a1111" in im.info["parameters"]
    np.testing.assert_array_equal(images["a1111"], images["sdengine_a1111_rule"])
    assert np.abs(images["a1111"] - images["diffusers"]).max() > 0


@pytest.mark.slow
def test_from_png_of_an_a1111_controlnet_image_fits_the_control_image_by_the_units_resize_mode(tmp_path):
    """The extension records each unit's fit ("Crop and Resize" by default); sdengine's one Resize mode follows."""
    from sdengine.metadata import VERSION, save_png

    edges, made = _controlnet_png(tmp_path)
    wide = tmp_path / "wide.png"
    picture(96, 48).save(wide)
    text = Image.open(made).info["parameters"].replace(f"Version: {VERSION}", "Version: v1.10.1")
    unit = 'ControlNet 0: "Module: canny, '
    crop = text.replace(unit, unit + "Resize Mode: Crop and Resize, ")
    for name, infotext in {"crop": crop, "just": text}.items():
        png = tmp_path / f"{name}.png"
        save_png(Image.open(made), png, infotext)
        assert _generate("--from-png", str(png), "--control", f"canny:{wide}", "--out", str(tmp_path / name)) == 0
    with Image.open(tmp_path / "crop" / "00000-4.png") as im:
        assert "Resize mode: crop and resize" in im.info["parameters"]
    with Image.open(tmp_path / "just" / "00000-4.png") as im:
        assert "Resize mode" not in im.info["parameters"]


def test_from_png_of_an_a1111_png_runs_a1111s_unipc_and_noise_defaults(model, tmp_path):
    """An A1111 PNG leaves out A1111's defaults: its GPU noise (no "RNG") and UniPC's bh1 of order 3 (no "UniPC
    variant" / "UniPC order"). `--from-png` ran sdengine's (CPU noise, bh2 of order 2): another image. Now it runs
    A1111's, and writes them; an sdengine PNG still runs its own; another --sampler keeps only its own options."""
    import sdengine
    from sdengine.metadata import save_png

    head = "a ball\nSteps: 5, Sampler: UniPC, Schedule type: Karras, CFG scale: 7, Seed: 4, Size: 32x32"
    blank = Image.new("RGB", (32, 32))
    save_png(blank, tmp_path / "a1111.png", f"{head}, Version: v1.10.1")
    assert (
        _generate("--from-png", str(tmp_path / "a1111.png"), "--model", str(model), "--out", str(tmp_path / "a")) == 0
    )
    (made,) = (tmp_path / "a").glob("*.png")
    pipe = sdengine.load_pipeline(model, device="cpu")
    kw = dict(steps=5, sampler="unipc", schedule="karras", cfg_scale=7, seed=4, width=32, height=32, progress=False)
    want = pipe("a ball", sampler_options={"variant": "bh1", "order": 3}, noise_source="nv", **kw)
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(want.images[0]))
    text = Image.open(made).info["parameters"]
    assert "UniPC variant: bh1, UniPC order: 3" in text and "RNG: NV" in text
    assert not np.array_equal(np.asarray(want.images[0]), np.asarray(pipe("a ball", **kw).images[0]))
    # sdengine's own PNG without those fields (written before them): its own CPU noise and bh2 of order 2
    save_png(blank, tmp_path / "own.png", f"{head}, Version: sdengine 0.1.0")
    assert _generate("--from-png", str(tmp_path / "own.png"), "--model", str(model), "--out", str(tmp_path / "b")) == 0
    (made,) = (tmp_path / "b").glob("*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(pipe("a ball", **kw).images[0]))
    # another sampler: UniPC's options are not passed to it (it was "sampler 'euler' has no option order")
    out = tmp_path / "c"
    assert (
        _generate(
            "--from-png", str(tmp_path / "a1111.png"), "--model", str(model), "--sampler", "euler", "--out", str(out)
        )
        == 0
    )
    (made,) = out.glob("*.png")
    euler = pipe("a ball", noise_source="nv", **{**kw, "sampler": "euler"})
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(euler.images[0]))
