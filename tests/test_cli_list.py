"""``sdengine list``: built-in models, ControlNets and LoRAs by name, files in the folders given, samplers and
schedules with their A1111 names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdengine.cli import main


def _list(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["list", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json(capsys, *args: str) -> list[dict]:
    rc, out, _ = _list(capsys, *args, "--json")
    assert rc == 0
    return json.loads(out)


def test_builtin_models_are_the_pipelines_names(capsys):
    from sdengine.pipeline import BUILTIN_PIXEL, BUILTIN_SD

    rows = _json(capsys, "models")
    names = [r["name"] for r in rows]
    assert sorted(names) == sorted([*BUILTIN_SD, *BUILTIN_PIXEL])
    for r in rows:
        assert r["source"] == "built-in" and Path(r["path"]).is_dir()
    assert "pixel DDPM" in next(r for r in rows if r["name"] == "fashion-mnist")["detail"]
    assert next(r for r in rows if r["name"] == "emoji")["detail"].endswith(", tiny VAE)")  # its vae_tiny/


def test_shipped_controlnet_and_lora(capsys):
    cn = _json(capsys, "controlnets")
    assert [r["name"] for r in cn] == ["emoji-controlnet-canny"]
    assert (Path(cn[0]["path"]) / "config.json").is_file()
    loras = _json(capsys, "loras")
    assert [r["name"] for r in loras] == ["emoji-fruit"]
    assert Path(loras[0]["path"]).suffix == ".safetensors" and Path(loras[0]["path"]).is_file()


def test_folders_are_listed_after_the_builtins(tmp_path, capsys):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(b"x" * 3000)
    (loras / "notes.txt").write_text("not a lora")
    (loras / ".hidden.safetensors").write_bytes(b"x")
    rows = _json(capsys, "loras", "--loras-dir", str(loras))
    assert [r["name"] for r in rows] == ["emoji-fruit", "style"]
    assert rows[1]["source"] == str(loras) and "2.9 KiB" in rows[1]["detail"]

    models = tmp_path / "models"
    (models / "sd-folder").mkdir(parents=True)
    (models / "sd-folder" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (models / "v1-5.ckpt").write_bytes(b"0")
    (models / "empty-folder").mkdir()
    rc, out, _ = _list(capsys, "models", "--models-dir", str(models))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "WHAT", "PATH"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["emoji", "fashion-mnist", "sd-folder", "v1-5"]

    cns = tmp_path / "cn"
    (cns / "canny").mkdir(parents=True)
    (cns / "canny" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (cns / "depth.pth").write_bytes(b"0")
    rows = _json(capsys, "controlnets", "--controlnets-dir", str(cns))
    assert [r["name"] for r in rows] == ["emoji-controlnet-canny", "canny", "depth"]


def test_embeddings_are_listed_with_how_to_use_them(tmp_path, capsys):
    rc, out, err = _list(capsys, "embeddings")
    assert rc == 0 and out == "" and "no embeddings (give --embeddings-dir FOLDER)" in err
    (tmp_path / "bad-hands.pt").write_bytes(b"0")
    (tmp_path / "easyneg.safetensors").write_bytes(b"0")
    rc, out, err = _list(capsys, "embeddings", "--embeddings-dir", str(tmp_path))
    assert rc == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["bad-hands", "easyneg"]
    assert "generate --embeddings-dir FOLDER" in err and "cannot" not in err  # they load (docs/embeddings.md)


def test_samplers_with_a1111_names(capsys):
    from sdengine.diffusion.sampling import SAMPLERS, resolve

    rows = _json(capsys, "samplers")
    assert [r["name"] for r in rows] == list(SAMPLERS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["dpmpp_2m"]["a1111"] == "DPM++ 2M"
    assert "DPM++ 2M Karras" in by_name["dpmpp_2m"]["a1111_with_schedule"]
    assert by_name["euler_a"]["a1111"] == "Euler a" and by_name["euler_a"]["stochastic"] is True
    assert by_name["lcm"]["schedules"][:2] == ["normal", "sgm_uniform"] and "karras" not in by_name["lcm"]["schedules"]
    for r in rows:  # every name shown is one --sampler accepts, and it selects that sampler
        assert resolve(r["a1111"])[0] == r["name"]
        for combined in r["a1111_with_schedule"]:
            name, sched = resolve(combined)
            assert name == r["name"] and sched in r["schedules"] and sched != "normal"
    rc, out, _ = _list(capsys, "samplers")
    assert rc == 0 and any(line.split()[:3] == ["dpmpp_2m", "DPM++", "2M"] for line in out.splitlines())


def test_schedules(capsys):
    from sdengine.diffusion.schedules import SCHEDULES

    rows = _json(capsys, "schedules")
    assert [r["name"] for r in rows] == list(SCHEDULES)
    assert {r["name"]: r["a1111"] for r in rows}["karras"] == "Karras"


def test_missing_folder_is_one_line(capsys):
    rc, _, err = _list(capsys, "loras", "--loras-dir", "/nonexistent/loras")
    assert rc == 2
    assert err.startswith("sdengine: error:") and err.count("\n") == 1 and "/nonexistent/loras" in err


def test_unknown_kind_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list", "checkpoints"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'checkpoints'" in err and "models" in err and "controlnets" in err


_NO_TORCH = """
import argparse, sys
from sdengine.commands import list as list_cmd, pnginfo, xyz
p = argparse.ArgumentParser()
sub = p.add_subparsers()
for m in (list_cmd, pnginfo, xyz):
    m.register(sub)
for argv in {argvs!r}:
    a = p.parse_args(argv)
    assert a.func(a) == 0
assert "torch" not in sys.modules, "torch was imported"
print("no torch")
"""


def test_listing_files_needs_no_torch(tmp_path):
    """Registering list/pnginfo/xyz and listing models, LoRAs, ControlNets and embeddings stay torch-free (fast)."""
    import subprocess
    import sys

    argvs = [
        ["list", "models"],
        ["list", "loras", "--loras-dir", str(tmp_path)],
        ["list", "controlnets"],
        ["list", "embeddings"],
    ]
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run(
        [sys.executable, "-c", _NO_TORCH.format(argvs=argvs)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("no torch") and "emoji-fruit" in r.stdout


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom sdengine.cli import build_parser\nbuild_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-500:]


def test_a_reader_that_goes_away_ends_the_listing_quietly():
    """`sdengine list samplers | head -1`: the pipe closes early; no error line (it is no mistake), status 141."""
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    code = "import sys; from sdengine.cli import main; sys.exit(main(['list', 'samplers']))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "error" not in err and "Broken pipe" not in err, err


def test_the_command_line_lists_files_without_torch(tmp_path):
    """Through `main` (the real entry point), not only the commands' functions: listing files and `pnginfo` never
    import torch (the thread setting is checked without it); `list samplers` may."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom sdengine.cli import main\n"
        f"assert main(['list', 'models']) == 0 and main(['list', 'loras', '--loras-dir', {str(tmp_path)!r}]) == 0\n"
        f"main(['pnginfo', {str(tmp_path / 'none.png')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nprint('no torch')\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip().endswith("no torch"), r.stderr[-800:]


def test_a_name_with_a_newline_stays_on_its_row(tmp_path, capsys):
    # once the table broke in two at the newline (a row "b  L  ..." that names no file); --json was exact
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "a\nb.safetensors").write_bytes(b"x")
    (loras / "tab\tx\u202e.pt").write_bytes(b"x")  # a tab and a right-to-left override
    rc, out, _ = _list(capsys, "loras", "--loras-dir", str(loras))
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 4  # header, emoji-fruit and the two files
    assert lines[2].startswith("a\\nb ") and lines[2].endswith("a\\nb.safetensors")
    assert lines[3].startswith("tab\\tx\\u202e ")
    assert sorted(r["name"] for r in _json(capsys, "loras", "--loras-dir", str(loras))) == [
        "a\nb",
        "emoji-fruit",
        "tab\tx\u202e",
    ]


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["samplers", "--loras-dir", "x"], "--loras-dir is where LoRAs are: it changes nothing in 'list samplers'"),
        (
            ["embeddings", "--models-dir", "x"],
            "--models-dir is where models are: it changes nothing in 'list embeddings'",
        ),
        (["loras", "--embeddings-dir", "x"], "--embeddings-dir is where embeddings are"),
    ],
)
def test_a_folder_of_another_kind_is_refused(capsys, argv, flag):
    """`list embeddings --models-dir D` printed "no embeddings", `list samplers --loras-dir D` the samplers: the
    folder was ignored without a word."""
    rc, out, err = _list(capsys, *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and flag in err, err
    kind = flag.split()[0][2:-4]
    assert f"did you mean 'sdengine list {kind} --{kind}-dir DIR'?" in err


def test_wide_characters_keep_the_columns_aligned(tmp_path, capsys):
    """A name with an emoji or CJK letters (two terminal columns each) once shifted every column after it: the
    table was padded by character count. The SOURCE column starts at the same display column on every row."""
    import unicodedata

    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("\U0001f34eapple", "\u82f9\u679c", "plain", "cafe\u0301"):
        (loras / f"{name}.safetensors").write_bytes(b"x")
    rc, out, _ = _list(capsys, "loras", "--loras-dir", str(loras))
    assert rc == 0

    def columns(text: str) -> int:  # terminal columns, counted independently of the code under test
        return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)

    lines = out.splitlines()
    assert len(lines) == 6
    sources = ["SOURCE", "built-in"] + [str(loras)] * 4  # the second column of each row, in order
    starts = {columns(line[: line.index(source)]) for line, source in zip(lines, sources, strict=True)}
    assert len(starts) == 1, out
