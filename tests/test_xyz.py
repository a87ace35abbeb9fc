"""X/Y/Z plots: axis parsing (ranges, CSV quoting, prompt S/R), one-line errors, the grid layout, and on the
built-in emoji model that every cell of the grid is exactly the image the same single generation makes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdengine.cli import main
from sdengine.errors import UsageError
from sdengine.grids import (
    AXES,
    Axis,
    batch_grid,
    default_schedule,
    draw_xyz_grid,
    parse_axis,
    plan_cells,
    run_xyz,
)
from sdengine.image_info import read_image_parameters

# ------------------------------------------------------------------------------------------ axes (no model)


@pytest.mark.parametrize(
    ("spec", "name", "values"),
    [
        ("steps=10,20,30", "steps", (10, 20, 30)),
        ("steps=10-30 (+10)", "steps", (10, 20, 30)),
        ("steps=1-9 [3]", "steps", (1, 5, 9)),
        ("steps=3-1", "steps", (3, 2, 1)),
        ("seed=-1, 5, 7-8", "seed", (-1, 5, 7, 8)),
        ("cfg=3, 5.5,7", "cfg", (3.0, 5.5, 7.0)),
        ("cfg=1-2 (+0.25)", "cfg", (1.0, 1.25, 1.5, 1.75, 2.0)),
        ("CFG_Scale=7", "cfg", (7.0,)),
        ("strength=0.2-0.6 [3]", "strength", (0.2, 0.4, 0.6)),
        ("Sampler=DPM++ 2M Karras, euler_a", "sampler", ("DPM++ 2M Karras", "euler_a")),
        ("schedule=karras,Normal", "schedule", ("karras", "Normal")),
        ('prompt=apple,"red, shiny",pear', "prompt", ("apple", "red, shiny", "pear")),
        ("clip-skip=1,2", "clip_skip", (1, 2)),
    ],
)
def test_parse_axis(spec, name, values):
    axis = parse_axis(spec)
    assert axis.name == name
    assert axis.values == pytest.approx(values) if name in ("cfg", "strength") else axis.values == values


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("colour=1,2", "unknown axis 'colour'; valid: " + ", ".join(AXES)),
        ("steps", "expected NAME=V1,V2"),
        ("steps=", "no values"),
        ("steps=ten", "'ten' is not an integer"),
        ("cfg=high", "'high' is not a number"),
        ("steps=0,5", "not a positive number of steps"),
        ("strength=1.5", "not in (0, 1]"),
        ("steps=30-10 (+10)", "never reaches"),
        ("sampler=euler,dpmpp_9x", "unknown sampler 'dpmpp_9x'; did you mean 'dpmpp_2m'"),
        ("schedule=cosine", "unknown schedule 'cosine'"),
        ("steps=1-100000", "at most"),
        ("cfg=1-9 [0]", "asks for 0 values"),
    ],
)
def test_bad_axes_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError) as e:
        parse_axis(spec)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_plan_cells_prompt_search_and_replace_and_one_seed():
    x = parse_axis("prompt=apple,banana,cherry")
    y = parse_axis("steps=2,4")
    cells = plan_cells("a red apple", {"negative_prompt": "apple pie", "seed": None}, x, y)
    assert [(c.row, c.col) for c in cells] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [c.kwargs["prompt"] for c in cells[:3]] == ["a red apple", "a red banana", "a red cherry"]
    assert cells[1].kwargs["negative_prompt"] == "banana pie"
    assert [c.kwargs["steps"] for c in cells] == [2, 2, 2, 4, 4, 4]
    seeds = {c.kwargs["seed"] for c in cells}
    assert len(seeds) == 1 and 0 <= seeds.pop() < 2**32  # drawn once: every cell the same seed


def test_plan_cells_errors():
    with pytest.raises(UsageError, match="'pear' .* is not in the prompt or the negative prompt"):
        plan_cells("a red apple", {}, parse_axis("prompt=pear,banana"))
    with pytest.raises(UsageError, match="axis steps is given twice"):
        plan_cells("x", {}, parse_axis("steps=1,2"), parse_axis("steps=3"))
    with pytest.raises(UsageError, match="needs an init image"):
        plan_cells("x", {}, parse_axis("strength=0.5,0.7"))
    # an explicit schedule the sampler cannot take is refused before anything runs, naming the cell
    with pytest.raises(UsageError, match="cell sampler=lcm, steps=3: sampler 'lcm' cannot use schedule 'karras'"):
        plan_cells("x", {"schedule": "karras"}, parse_axis("sampler=euler,lcm"), parse_axis("steps=3"))


def test_default_schedule_fits_each_sampler():
    assert default_schedule("dpmpp_2m") == "karras"
    assert default_schedule("lcm") is None and default_schedule("plms") is None
    assert default_schedule("DPM++ 2M Exponential") is None  # the name carries its schedule
    cells = plan_cells("x", {"seed": 1}, parse_axis("sampler=euler,lcm,DPM++ 2M Exponential"))
    assert [c.kwargs["schedule"] for c in cells] == ["karras", None, None]
    cells = plan_cells("x", {"seed": 1}, parse_axis("sampler=euler,lcm"), parse_axis("schedule=normal,sgm_uniform"))
    assert [(c.kwargs["sampler"], c.kwargs["schedule"]) for c in cells] == [
        ("euler", "normal"),
        ("lcm", "normal"),
        ("euler", "sgm_uniform"),
        ("lcm", "sgm_uniform"),
    ]


# -------------------------------------------------------------------------------------------- grid drawing


def _solid(i: int, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, (20 * i % 256, 255 - 30 * i % 256, 90))


def test_grid_layout_places_every_cell_exactly():
    imgs = [[[_solid(k * 6 + r * 3 + c) for c in range(3)] for r in range(2)] for k in range(2)]
    grid, layout = draw_xyz_grid(
        imgs, ["steps: 10", "steps: 20", "steps: 30"], ["sampler: euler", "sampler: lcm"], ["cfg: 3", "cfg: 7"]
    )
    assert grid.size == (layout.width, layout.height)
    assert len(layout.boxes) == 12
    for (k, r, c), box in layout.boxes.items():
        assert box[2] - box[0] == 40 and box[3] - box[1] == 30
        assert 0 <= box[0] and box[2] <= grid.width and 0 <= box[1] and box[3] <= grid.height
        assert np.array_equal(np.asarray(grid.crop(box)), np.asarray(imgs[k][r][c]))
        if c:  # columns left to right, rows top to bottom, z planes side by side
            assert box[0] >= layout.boxes[(k, r, c - 1)][2] and box[1] == layout.boxes[(k, r, c - 1)][1]
        if r:
            assert box[1] >= layout.boxes[(k, r - 1, c)][3] and box[0] == layout.boxes[(k, r - 1, c)][0]
        if k:
            assert box[0] > layout.boxes[(k - 1, r, 2)][2]
    # labels: dark text above the first row and left of the first column, outside every cell
    a = np.asarray(grid).astype(int)
    top = min(b[1] for b in layout.boxes.values())
    left = min(b[0] for b in layout.boxes.values())
    assert (a[:top].sum(-1) < 200).sum() > 20
    assert (a[top:, :left].sum(-1) < 200).sum() > 20
    # a plain grid (x only) has no room for row labels
    g2, l2 = draw_xyz_grid([[[_solid(1), _solid(2)]]], ["a", "b"])
    assert l2.boxes[(0, 0, 0)][0] < 10 and g2.width < 2 * 40 + 20


def test_grid_refuses_mismatched_input():
    with pytest.raises(UsageError, match="same size"):
        draw_xyz_grid([[[_solid(1), _solid(2, (20, 20))]]])
    with pytest.raises(UsageError, match="3 column labels for 2 columns"):
        draw_xyz_grid([[[_solid(1), _solid(2)]]], ["a", "b", "c"])


def test_batch_grid():
    imgs = [_solid(i, (8, 6)) for i in range(5)]
    g = batch_grid(imgs)
    assert g.size == (3 * 8, 2 * 6)
    for i, im in enumerate(imgs):
        x, y = (i % 3) * 8, (i // 3) * 6
        assert np.array_equal(np.asarray(g.crop((x, y, x + 8, y + 6))), np.asarray(im))
    assert np.asarray(g)[6:, 16:].max() == 0  # the empty place is black
    assert batch_grid(imgs, cols=5).size == (40, 6)


# ------------------------------------------------------------------------------------- the emoji model (CLI)


@pytest.fixture(scope="module")
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster here and gives the same pixels
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def emoji(one_thread):
    from sdengine.pipeline import load_pipeline

    return load_pipeline("emoji", device="cpu")


def test_xyz_cli_grid_cells_equal_single_generations(emoji, tmp_path, capsys):
    out = tmp_path / "plot"
    rc = main(
        [
            "xyz",
            "a red apple",
            "--x",
            "steps=2,3",
            "--y",
            "sampler=euler,lcm",
            "--z",
            "cfg=3,6",
            "--seed",
            "11",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out.split()
    cells, grid_path = printed[:-1], printed[-1]
    assert len(cells) == 8 and grid_path.endswith("xyz-00000.png")
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    assert json.loads(Image.open(grid_path).info["sdengine-xyz"])["axes"] == ["steps", "sampler", "cfg"]
    assert read_image_parameters(grid_path) is None  # the grid is not one generation
    assert main(["pnginfo", grid_path]) == 2
    assert "is an sdengine X/Y/Z grid" in capsys.readouterr().err
    # generate --from-png of it once said "not written by sdengine or A1111"
    assert main(["generate", "--from-png", grid_path, "--out", str(tmp_path / "again")]) == 2
    assert "is an sdengine X/Y/Z grid, not one generation: give --from-png one of its cells" in capsys.readouterr().err

    # cells are written z, then row, then column; each PNG is its cell of the grid
    x, y, z = Axis("steps", (2, 3)), Axis("sampler", ("euler", "lcm")), Axis("cfg", (3.0, 6.0))
    layout = draw_xyz_grid(
        [[[Image.new("RGB", (64, 64))] * 2] * 2] * 2,
        [x.label(v) for v in x.values],
        [y.label(v) for v in y.values],
        [z.label(v) for v in z.values],
    )[1]
    assert grid.shape[:2] == (layout.height, layout.width)
    for i, path in enumerate(cells):
        k, r, c = i // 4, (i // 2) % 2, i % 2
        cell = np.asarray(Image.open(path).convert("RGB"))
        assert cell.shape == (64, 64, 3)
        left, top, right, bottom = layout.boxes[(k, r, c)]
        assert np.array_equal(grid[top:bottom, left:right], cell), (k, r, c)
        text = read_image_parameters(path)
        assert f"Steps: {x.values[c]}," in text and f"CFG scale: {z.values[k]:g}," in text and "Seed: 11," in text
        assert ("Sampler: Euler," if r == 0 else "Sampler: LCM,") in text

    # a cell equals the same generation made alone (lcm with no schedule chosen: its own, not karras)
    alone = emoji("a red apple", steps=2, sampler="lcm", schedule="normal", cfg_scale=6.0, seed=11, progress=False)
    left, top, right, bottom = layout.boxes[(1, 1, 0)]
    assert np.array_equal(grid[top:bottom, left:right], np.asarray(alone.images[0]))
    alone = emoji("a red apple", steps=3, sampler="euler", schedule="karras", cfg_scale=3.0, seed=11, progress=False)
    left, top, right, bottom = layout.boxes[(0, 0, 1)]
    assert np.array_equal(grid[top:bottom, left:right], np.asarray(alone.images[0]))
    l0, t0, r0, b0 = layout.boxes[(0, 0, 0)]  # 2 steps: a different picture
    assert not np.array_equal(grid[top:bottom, left:right], grid[t0:b0, l0:r0])


def test_xyz_prompt_search_and_replace_api(emoji):
    res = run_xyz(emoji, "a red apple", {"steps": 2, "seed": 3, "progress": False}, parse_axis("prompt=apple,banana"))
    assert [c.kwargs["prompt"] for c in res.cells] == ["a red apple", "a red banana"]
    alone = emoji("a red banana", steps=2, seed=3, progress=False)
    assert np.array_equal(np.asarray(res.grid.crop(res.layout.boxes[(0, 0, 1)])), np.asarray(alone.images[0]))
    assert not np.array_equal(np.asarray(res.results[0].images[0]), np.asarray(alone.images[0]))
    assert "a red banana" in res.results[1].infotexts[0]


def test_xyz_cli_errors_are_one_line(tmp_path, capsys):
    for args, message in [
        (["--x", "colour=red"], "unknown axis 'colour'; valid: steps, sampler"),
        (["--x", "prompt=pear,fig"], "'pear' (the first value, the text to replace) is not in the prompt"),
        (["--x", "steps=2", "--y", "steps=3"], "axis steps is given twice"),
        (["--x", "steps=2", "--out", str(tmp_path / "grid.png")], "names an image; it is the folder"),
        # a value only a cell's request refuses: every cell checked before the model loads (cells 1 and 2 were
        # once drawn and written, then the third failed, with no grid)
        (["--x", "cfg=5,7,101"], "cell 3/3: cfg_scale"),
        (["--x", "seed=1,18446744073709551616"], "cell 2/2: seed"),
        (["--x", "steps=2,3", "--y", "prompt=apple,(apple:500)"], "cell 3/4: prompt weight"),
        # once dropped without a word: every cell was text-to-image
        (["--x", "steps=2", "--strength", "0.5"], "--strength has no effect without --init-image"),
        (["--x", "steps=2", "--lora-dir", str(tmp_path / "nope")], "LoRA folder"),
        # a folder no cell's prompt names a LoRA from: once never looked at
        (["--x", "steps=2", "--lora-dir", str(tmp_path)], "--lora-dir is where <lora:NAME> tags and --lora names"),
        # a flag for what an axis sets: every cell took the axis's value, the flag dropped without a word
        (["--x", "steps=2,3", "--steps", "5"], "--steps 5 has no effect: steps is the X axis"),
        (["--x", "steps=2", "--y", "cfg_scale=3,4", "--cfg", "6"], "--cfg 6.0 has no effect: cfg is the Y axis"),
        (["--x", "steps=2", "--z", "seed=1,2", "--seed", "-1"], "--seed -1 has no effect: seed is the Z axis"),
    ]:
        rc = main(["xyz", "a red apple", "--out", str(tmp_path), *args, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir())  # nothing generated or written


@pytest.mark.parametrize("weight", ["1e30", "inf"])
def test_xyz_absurd_lora_weight_is_one_line(tmp_path, capsys, weight):
    from pathlib import Path

    import sdengine

    lora = Path(sdengine.__file__).parent / "assets" / "loras" / "emoji-fruit.safetensors"
    rc = main(
        [
            "xyz",
            "a red apple",
            "--model",
            "emoji",
            "--x",
            "steps=2",
            "--lora",
            f"{lora}:{weight}",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "emoji-fruit: weight" in err, err
    assert not list(tmp_path.rglob("*.png"))


def test_seed_axis_minus_one_is_drawn_before_the_plot(emoji, tmp_path, capsys):
    """`--x seed=-1,5` (A1111's "random seed" in a seed axis): the -1 is drawn before the plot, as A1111's
    fix_axis_seeds does, so the grid's label, its sdengine-xyz record and the cell's file name all give the seed
    the image was made with (the grid once read "seed: -1" and recorded -1, and the summary said "seed -1")."""
    out = tmp_path / "plot"
    args = ["xyz", "a red apple", "--x", "seed=-1,5", "--steps", "1", "--device", "cpu", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    captured = capsys.readouterr()
    cells, grid_path = captured.out.split()[:-1], captured.out.split()[-1]
    seeds = [int(read_image_parameters(c).split("Seed: ")[1].split(",")[0]) for c in cells]
    assert seeds[1] == 5 and seeds[0] != -1
    assert [c.rsplit("-", 1)[1] for c in cells] == [f"{s}.png" for s in seeds]
    record = json.loads(Image.open(grid_path).info["sdengine-xyz"])
    assert record["x"] == seeds and record["seed"] == seeds[0]
    assert f"seed {seeds[0]}," in captured.err
    # through the Python API too: the cells carry the drawn seed, never -1
    res = run_xyz(emoji, "a red apple", {"steps": 1, "progress": False}, parse_axis("seed=-1"))
    assert res.cells[0].kwargs["seed"] != -1 and res.results[0].seeds[0] == res.cells[0].kwargs["seed"]

    from sdengine.grids import fix_axis_seeds

    axis = fix_axis_seeds(parse_axis("seed=-1,5,-1"))
    assert axis.values[1] == 5 and all(0 <= v < 2**32 for v in axis.values)
    assert fix_axis_seeds(parse_axis("steps=1,2")) == parse_axis("steps=1,2")


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("blocker.txt", "blocker.txt is a file, not a folder"),
        ("blocker.txt/plots", "blocker.txt is a file, not a folder"),
    ],
)
def test_xyz_out_is_checked_before_any_cell(tmp_path, capsys, monkeypatch, out, message):
    """An --out that is (or is under) a file stopped only when the first cell was saved, after it was drawn, with
    "[Errno 17] File exists"; now one line before the model loads, as generate's."""
    import sdengine.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(sdengine.pipeline, "load_pipeline", refuse)
    (tmp_path / "blocker.txt").write_text("x")
    rc = main(["xyz", "a red apple", "--x", "steps=1,2", "--out", str(tmp_path / out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert (tmp_path / "blocker.txt").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == [
        "blocker.txt"
    ]
