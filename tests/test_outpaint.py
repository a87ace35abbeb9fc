"""Outpainting: the canvas and mask geometry, the original kept, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdengine.errors import GenerationError
from sdengine.outpaint import finish_outpaint, outpaint, parse_sides, plan_outpaint


def _picture(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_plan_geometry():
    img = _picture(24, 16)
    plan = plan_outpaint(img, left=8, right=0, top=8, bottom=8, overlap=4)
    assert plan.canvas.size == (32, 32) and plan.mask.size == (32, 32) and plan.box == (8, 8, 32, 24)
    c, m = np.asarray(plan.canvas), np.asarray(plan.mask)
    np.testing.assert_array_equal(c[8:24, 8:32], np.asarray(img))  # the original in place
    np.testing.assert_array_equal(c[8:24, 0], np.asarray(img)[:, 0])  # the left band repeats the edge column
    np.testing.assert_array_equal(c[0, 8:], np.asarray(img)[0])  # the top band the edge row
    # white over the new area and 4 px into the original along the extended sides; the right side (not
    # extended) is kept to the edge
    assert (m[:, :12] == 255).all() and (m[:12] == 255).all() and (m[20:] == 255).all()
    assert (m[12:20, 12:32] == 0).all()


def test_sides_and_bad_input():
    assert parse_sides("32,0,8,16") == (32, 0, 8, 16) and parse_sides("8") == (8, 8, 8, 8)
    for text in ("1,2", "a,b,c,d"):
        with pytest.raises(GenerationError, match="--outpaint"):
            parse_sides(text)
    img = _picture(24, 16)
    with pytest.raises(GenerationError, match="new width 29 is not a multiple of 8; add 3 more pixels"):
        plan_outpaint(img, left=5)
    with pytest.raises(GenerationError, match="at least one side"):
        plan_outpaint(img)
    with pytest.raises(GenerationError, match=">= 0"):
        plan_outpaint(img, left=-8)
    # too large a canvas is refused before it is made (30000 px a side once filled 24 GB and was killed)
    with pytest.raises(GenerationError, match="new size 60024x16 is too large: each side may be at most 8192"):
        plan_outpaint(img, left=30000, right=30000, max_side=8192)


def test_outpaint_refuses_a_canvas_over_the_models_limit_before_any_work(tiny_sd1_folder):
    import tracemalloc

    from sdengine.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_sd1_folder), device="cpu")
    tracemalloc.start()
    try:
        with pytest.raises(GenerationError, match=f"at most {pipe.max_side()} px"):
            outpaint(pipe, "a wall", _picture(16, 1024), left=20000, right=20000, steps=2)
        assert tracemalloc.get_traced_memory()[1] < 50 * 2**20  # no 40016x1024 canvas (123 MB) was made
    finally:
        tracemalloc.stop()


def test_finish_puts_the_original_back():
    img = _picture(24, 16)
    plan = plan_outpaint(img, right=8, bottom=16, overlap=2)
    generated = Image.new("RGB", plan.canvas.size, (7, 7, 7))
    out = np.asarray(finish_outpaint(plan, generated))
    np.testing.assert_array_equal(out[:14, :22], np.asarray(img)[:14, :22])
    assert (out[:, 24:] == 7).all() and (out[16:] == 7).all() and (out[14:16, :22] == 7).all()


def test_outpaint_with_the_pipeline_keeps_the_original(tiny_sd1_folder):
    from sdengine.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_sd1_folder), device="cpu")
    img = _picture(16, 32)
    res = outpaint(pipe, "a wall", img, left=8, right=8, overlap=4, steps=3, seed=2, sampler="euler", progress=False)
    out = np.asarray(res.images[0]).astype(int)
    assert out.shape == (32, 32, 3) and res.arrays.shape == (1, 32, 32, 3)
    # outside the overlap the original is kept exactly; inside it (the blended seam) within a blend tolerance
    np.testing.assert_array_equal(out[:, 12:20], np.asarray(img)[:, 4:12])
    assert np.abs(res.arrays[0][:, 12:20] * 255 - np.asarray(img)[:, 4:12]).max() <= 0.5
    # the new area was generated, not left as the stretched edge
    assert np.abs(out[:, :8] - np.asarray(img)[:, :1]).mean() > 2


def test_cli_outpaint(tiny_sd1_folder, tmp_path, capsys):
    from sdengine.cli import main

    init = tmp_path / "init.png"
    _picture(24, 24).save(init)
    out = tmp_path / "o"
    assert (
        main(
            [
                "generate",
                "a wall",
                "--model",
                str(tiny_sd1_folder),
                "--steps",
                "2",
                "--seed",
                "1",
                "--init-image",
                str(init),
                "--outpaint",
                "8,0,0,8",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    made = np.asarray(Image.open(out / "00000-1.png"))
    assert made.shape == (32, 32, 3)
    # the default overlap is 8 px along the extended sides (left, bottom): the rest of the original is kept
    np.testing.assert_array_equal(made[0:16, 16:32], np.asarray(Image.open(init))[0:16, 8:24])
    capsys.readouterr()
    assert (
        main(["generate", "x", "--model", str(tiny_sd1_folder), "--outpaint", "8", "--out", str(out), "--no-progress"])
        == 2
    )
    assert "--outpaint extends --init-image" in capsys.readouterr().err


def test_from_png_of_an_outpainted_image(tiny_sd1_folder, tmp_path):
    from sdengine.cli import main

    init = tmp_path / "init.png"
    _picture(24, 24).save(init)
    common = ["--model", str(tiny_sd1_folder), "--init-image", str(init), "--outpaint", "8,0,0,8", "--no-progress"]
    assert main(["generate", "a wall", "--steps", "2", "--seed", "3", "--out", str(tmp_path / "a"), *common]) == 0
    made = tmp_path / "a" / "00000-3.png"
    assert main(["generate", "--from-png", str(made), "--out", str(tmp_path / "b"), *common]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(tmp_path / "b" / "00000-3.png")))


def test_from_png_of_an_outpainted_image_without_its_flags_names_outpaint(tiny_sd1_folder, tmp_path, capsys):
    """The first line a user met for an outpainted PNG asked for `--init-image (and --mask)`, the second (after
    giving the init image) for `--mask (or --outpaint)`: the first now names --outpaint too."""
    from sdengine.cli import main

    init = tmp_path / "init.png"
    _picture(24, 24).save(init)
    args = ["--model", str(tiny_sd1_folder), "--init-image", str(init), "--outpaint", "8", "--no-progress"]
    assert main(["generate", "a wall", "--steps", "2", "--seed", "3", "--out", str(tmp_path / "a"), *args]) == 0
    capsys.readouterr()
    made = tmp_path / "a" / "00000-3.png"
    assert (
        main(["generate", "--from-png", str(made), "--model", str(tiny_sd1_folder), "--out", str(tmp_path / "b")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("give the same --init-image (and --mask or --outpaint)"), err
