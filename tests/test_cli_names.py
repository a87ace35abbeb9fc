"""Everyday-use errors of the CLI: an unknown name suggests the closest accepted spelling in one line (instead of
listing every name), flags that need another flag name it, ``--control-res`` is range-checked, and every
subcommand's --help shows its options' defaults."""

from __future__ import annotations

import argparse

import pytest

from sdengine.cli import build_parser, main
from sdengine.names import close_matches, did_you_mean, fold, unknown_name_message


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        rc = main([*args])
    except SystemExit as e:  # argparse's own exits
        rc = int(e.code or 0)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_suggestions_ignore_case_spaces_and_underscores() -> None:
    assert fold("Euler_a") == fold("euler a") == fold("EULER-A")
    assert close_matches("eular a", ["euler_a", "heun", "lms"]) == ["euler_a"]
    assert close_matches("DPM++ 2M", {"dpm++ 2m": "dpmpp_2m"}) == ["dpmpp_2m"]  # the same letters: that one
    assert close_matches("zzzz", ["euler_a", "heun"]) == []
    assert did_you_mean("zzzz", ["euler_a"]) == ""
    text = unknown_name_message("sampler", "eular a", ["euler_a"], labels={"euler_a": "Euler a"}, hint="see X")
    assert text == "unknown sampler 'eular a'; did you mean 'euler_a' ('Euler a')? (see X)"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--sampler", "eular a"], "unknown sampler 'eular a'; did you mean 'euler_a' ('Euler a')?"),
        (["--sampler", "dpmpp_2m_sd"], "did you mean 'dpmpp_2m_sde'"),
        (["--schedule", "karas"], "unknown schedule 'karas'; did you mean 'karras'"),
    ],
)
def test_an_unknown_sampler_or_schedule_suggests_the_closest_in_one_short_line(
    capsys: pytest.CaptureFixture[str], tmp_path, args: list[str], said: str
) -> None:
    rc, err = _run(capsys, "generate", "a cat", "--model", "emoji", "--steps", "1", "--out", str(tmp_path), *args)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert said in err and "lists all" in err, err
    assert len(err) < 300, err  # not the ~150 names it once listed
    assert not list(tmp_path.iterdir())


def test_unknown_subcommand_topic_model_and_control_type_suggest_the_closest(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    rc, err = _run(capsys, "genrate", "a cat")
    assert rc == 2 and "did you mean 'generate'?" in err and len(err.splitlines()) == 1, err
    rc, err = _run(capsys, "list", "sampelrs")
    assert rc == 2 and "did you mean 'samplers'?" in err, err
    rc, err = _run(capsys, "generate", "a cat", "--model", "emojj", "--steps", "1", "--out", str(tmp_path))
    assert rc != 0 and "did you mean 'emoji'?" in err and len(err.splitlines()) == 1, err
    image = tmp_path / "c.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    rc, err = _run(
        capsys, "generate", "a cat", "--model", "emoji", "--steps", "1", "--out", str(tmp_path / "o"),
        "--control", f"cany:{image}", "--controlnet", "emoji-controlnet-canny",
    )  # fmt: skip
    assert rc != 0 and "did you mean 'canny'?" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_mask_without_init_image_names_the_flags(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from PIL import Image

    mask = tmp_path / "m.png"
    Image.new("L", (32, 32), 255).save(mask)
    rc, err = _run(capsys, "generate", "a cat", "--model", "emoji", "--mask", str(mask), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--mask has no effect without --init-image" in err and "init_image" not in err, err


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--control-res", "10"], "--control-res 10: give a short side in pixels in [64, 2048]"),
        (["--control-res", "512", "--control-res", "256", "--control-res", "128"], "3 --control-res for 1 --control"),
    ],
)
def test_control_res_is_checked(capsys: pytest.CaptureFixture[str], tmp_path, extra: list[str], said: str) -> None:
    from PIL import Image

    image = tmp_path / "c.png"
    Image.new("RGB", (32, 32)).save(image)
    common = ["generate", "a cat", "--model", "emoji", "--steps", "1", "--out", str(tmp_path / "o")]
    control = ["--control", f"canny:{image}", "--controlnet", "emoji-controlnet-canny"]
    rc, err = _run(capsys, *common, *control, *extra)
    assert rc == 2 and said in err and len(err.splitlines()) == 1, err
    rc, err = _run(capsys, *common, "--control-res", "512")
    assert rc == 2 and "--control-res is the resolution of a --control preprocessor" in err, err
    assert not (tmp_path / "o").exists()


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:  # argparse keeps no public list of its subcommands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def test_every_subcommands_help_shows_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """Each subcommand's --help runs, and each option with a default (not None/False) says it in its own help
    entry (``bench --steps``: "default: 25")."""
    subs = list(_subparsers(build_parser()))
    assert len(subs) > 10
    for path, sub in subs:
        rc, _ = _run(capsys, *path, "--help")
        assert rc == 0, path
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            entry = " ".join(sub._get_formatter()._format_action(action).split())
            assert "default" in entry, (path, entry)
    bench = dict(subs)[("bench",)]
    steps = next(a for a in bench._actions if "--steps" in a.option_strings)
    assert "default: 25" in " ".join(bench._get_formatter()._format_action(steps).split())


def test_control_res_scales_the_control_image_before_its_preprocessor(tmp_path) -> None:
    from PIL import Image

    from sdengine.commands.generate import control_units_from_cli

    image = tmp_path / "c.png"
    Image.new("RGB", (200, 100), (200, 10, 10)).save(image)
    scaled = control_units_from_cli([f"canny:{image}"], ["emoji-controlnet-canny"], processor_res=[64])[0]
    plain = control_units_from_cli([f"canny:{image}"], ["emoji-controlnet-canny"])[0]
    assert scaled.image.size == (128, 64) and scaled.processor_res == 64  # short side 64, aspect kept
    assert plain.image.size == (200, 100) and plain.processor_res is None


def test_the_server_names_its_own_listing_route_not_the_cli(tmp_path) -> None:
    """A client of the server has no CLI: an unknown sampler or schedule on the A1111 routes points at
    ``GET /sdapi/v1/samplers`` / ``schedulers``, on the native and OpenAI routes at ``GET /v1/samplers``; the
    suggestion stays."""
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app
    from sdengine.server.config import ServerConfig

    app = create_app(ServerConfig(outputs_dir=tmp_path / "out"), loader=lambda ref, dev: None, preload=False)
    client = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: the 400s come before any worker
    cases = (
        ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Eular a"}, "GET /sdapi/v1/samplers lists all"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "karas"}, "GET /sdapi/v1/schedulers lists all"),
        ("/v1/jobs", {"prompt": "x", "sampler": "eular_a"}, "GET /v1/samplers lists all"),
        ("/v1/images/generations", {"prompt": "x", "sampler": "eular_a"}, "GET /v1/samplers lists all"),
    )
    for route, body, hint in cases:
        r = client.post(route, json=body)
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and message.endswith(f"({hint})"), (route, message)
        assert "did you mean" in message and "sdengine list" not in message and "\n" not in message
