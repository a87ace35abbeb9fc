"""Flags of the ``sdengine`` command line that would change nothing: refused in one line, never dropped without
a word (an explicit flag argparse cannot tell from its default, a repeated flag of which argparse keeps the last)."""

from __future__ import annotations

from pathlib import Path

import pytest

import sdengine
from sdengine.cli import main


def _refused(capsys, argv: list[str]) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own mistakes
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("sdengine: error: "), err
    return err


def test_lora_ema_decay_without_ema_is_refused(tmp_path, capsys):
    """`train lora --ema-decay 0.5` without --ema trained and wrote the last weights, the decay unused: it was
    indistinguishable from its default."""
    (tmp_path / "data").mkdir()
    argv = ["train", "lora", "--model", "emoji", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    err = _refused(capsys, [*argv, "--ema-decay", "0.5"])
    assert "--ema-decay is the decay of --ema's average: give --ema too" in err
    assert not (tmp_path / "run").exists()


def test_ema_decay_help_still_shows_its_default(capsys):
    """--ema-decay's default is None until the run resolves it (so that a given one is told apart): --help must
    still name the trainer's real default, not "None"."""
    for kind, default in (("lora", "0.999"), ("controlnet", "0"), ("ddpm", "0.999")):
        with pytest.raises(SystemExit):
            main(["train", kind, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        described = text.rsplit("--ema-decay EMA_DECAY ", 1)[-1][:80]  # its help (the last mention), not the usage
        assert f"default: {default}" in described and "None" not in described, (kind, described)


@pytest.mark.parametrize(
    "axes",
    [
        ["--x", "steps=1,2", "--x", "cfg=1,2"],
        ["--x", "steps=1,2", "--z", "seed=1,2", "--z", "cfg=1,2"],
    ],
)
def test_xyz_repeated_axis_flag_is_refused(tmp_path, capsys, axes):
    """argparse keeps the last of a repeated flag: `--x steps=1,2 --x cfg=1,2` plotted cfg alone."""
    err = _refused(capsys, ["xyz", "a red apple", "--out", str(tmp_path), *axes, "--no-progress"])
    twice = axes[-1]
    assert f"argument {axes[-2]}: given twice" in err and twice in err, err
    assert "(see 'sdengine xyz --help')" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv,help_of",
    [
        (["generate", "x", "--no-such-flag", "3"], "sdengine generate"),
        (["train", "lora", "--model", "emoji", "--data", "d", "--epochs", "2"], "sdengine train lora"),
        (["list", "models", "extra"], "sdengine list"),
        (["pnginfo", "a.png", "--raw"], "sdengine pnginfo"),
    ],
)
def test_unrecognized_arguments_name_the_subcommands_help(capsys, argv, help_of):
    """argparse reports leftover arguments from the root parser: the line said `see 'sdengine --help'`, whose
    help lists none of the subcommand's flags."""
    err = _refused(capsys, argv)
    assert "unrecognized arguments: " in err and f"(see '{help_of} --help')" in err, err


@pytest.mark.parametrize(
    "argv,message",
    [
        # the ControlNet a PNG names is looked up there; --controlnet takes a path: the folder was unused
        (
            ["generate", "apple", "--steps", "1", "--controlnets-dir", "{tmp}", "--out", "{out}"],
            "--controlnets-dir is where --from-png looks up the ControlNet a PNG names: it has no effect without "
            "--from-png",
        ),
        # the tiny VAE was loaded and never used: neither decode nor encode was the tiny one
        (
            ["generate", "apple", "--steps", "1", "--tiny-vae", "{emoji}/vae_tiny", "--vae-decode", "full"]
            + ["--out", "{out}"],
            "--tiny-vae has no effect with --vae-decode full (and without --vae-encode tiny)",
        ),
        # the key is required whatever the flag says; on loopback no key is asked anyway
        (["serve", "--insecure-no-auth", "--api-key", "k", "--port", "0"], "--insecure-no-auth has no effect with"),
        (["serve", "--insecure-no-auth", "--port", "0"], "--insecure-no-auth has no effect on 127.0.0.1"),
        # only --random's model folder (and --decoders' tiny VAE) is kept there
        (
            ["bench", "--model", "{tmp}", "--workdir", "{out}"],
            "--workdir keeps --random's model folder (and --decoders' tiny VAE): with --model it is unused",
        ),
        # ready-made control maps: no preprocessor runs, its options were dropped
        (
            ["train", "controlnet", "--model", "no-such-model", "--data", "{tmp}", "--condition-dir", "{tmp}"]
            + ["--condition-option", "low=50", "--out", "{out}"],
            "--condition-option sets the preprocessor, which does not run with --condition-dir",
        ),
        (
            ["train", "tiny-vae", "--model", "no-such-model", "--no-encoder", "--encoder-weight", "2"]
            + ["--out", "{out}"],
            "--encoder-weight has no effect with --no-encoder",
        ),
        (
            ["train", "tiny-vae", "--model", "no-such-model", "--keep-decoder", "{tmp}", "--latents", "sample"]
            + ["--out", "{out}"],
            "--latents sample has no effect with --keep-decoder",
        ),
        (
            ["train", "tiny-vae", "--model", "no-such-model", "--keep-decoder", "{tmp}", "--image-weight", "1"]
            + ["--out", "{out}"],
            "--image-weight has no effect with --keep-decoder",
        ),
        (
            ["train", "emoji", "--write-folders", "{tmp}/file/x", "--seed", "3", "--lr", "0.1", "--out", "{out}"],
            "--write-folders only writes the renders and trains nothing: --out, --lr, --seed would change nothing",
        ),
        (
            ["train", "emoji", "--init-unet", "{tmp}/missing", "--vae-steps", "5", "--max-minutes-vae", "1"],
            "--init-unet continues an exported model (its VAE kept, its pooled vector there): --vae-steps, "
            "--max-minutes-vae would change nothing",
        ),
    ],
)
def test_flags_without_effect_in_combination_are_refused(tmp_path, capsys, argv, message):
    """Found by reading every command for flags used only with another (docs/cli.md): each was dropped without
    a word; now one line before anything loads or is written."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    emoji = Path(sdengine.__file__).parent / "assets" / "models" / "emoji"
    argv = [s.replace("{tmp}", str(tmp_path)).replace("{out}", str(out)).replace("{emoji}", str(emoji)) for s in argv]
    err = _refused(capsys, argv)
    assert message in err, err
    assert not out.exists()
