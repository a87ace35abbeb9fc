"""The pixel DDPM end to end on tiny settings: train, resume exactly, export, load, sample; CLI errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdengine.cli import main
from sdengine.ddpm import PixelDDPM
from sdengine.models.unet import TINY_PIXEL
from sdengine.train.checkpoint import load_checkpoint
from sdengine.train.ddpm import DDPMSpec, train_ddpm
from sdengine.train.loop import TrainConfig

TINY = dataclasses.replace(TINY_PIXEL, block_out_channels=(16, 32), num_heads=(1, 2))


def toy_data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """Two classes of 16x16 images: a bright square on the left, or on the right."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    x = -torch.ones(n, 1, 16, 16)
    for i in range(n):
        c = 2 if labels[i] == 0 else 9
        x[i, :, 5:11, c : c + 5] = 1.0
    x += 0.05 * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1), labels, ["left", "right"], 0


def spec() -> DDPMSpec:
    return DDPMSpec(data="toy", class_conditional=True, image_size=16, channels=1, unet=TINY)


def cfg(steps: int, **kw: object) -> TrainConfig:
    base = dict(steps=steps, batch_size=16, lr=2e-3, warmup_steps=5, sample_every=0, checkpoint_every=0, seed=1)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm")
    result, model = train_ddpm(spec(), cfg(80), out, data=toy_data(), progress=False)
    return out, result, model


def test_loss_falls_and_artifacts_written(trained):
    out, result, _ = trained
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    for name in ("checkpoint.pt", "loss.png", "samples_latest.png", "model/config.json", "model/unet.safetensors"):
        assert (out / name).is_file(), name


def test_exported_model_loads_and_matches_checkpoint_ema(trained):
    out, _, _ = trained
    folder = PixelDDPM.load(out / "model")
    ckpt = PixelDDPM.load(out / "checkpoint.pt")
    assert folder.class_names == ["left", "right"] and folder.null_class == 2
    for k, v in ckpt.unet.state_dict().items():
        # the folder holds the EMA weights in fp16
        assert torch.allclose(folder.unet.state_dict()[k], v.half().float()), k


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_seeded_per_image(trained, sampler):
    _, _, model = trained
    steps = 20
    a = model.generate([0, 1, 1], sampler=sampler, steps=steps, seed=5)
    b = model.generate([1], sampler=sampler, steps=steps, seed=6)  # image 1 of the batch, alone
    assert a.shape == (3, 1, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.allclose(a[1:2], b, atol=1e-5)
    assert not torch.allclose(a[1], a[2])  # different seeds, different images


def test_eight_steps_equal_four_plus_resume_plus_four(tmp_path):
    # 48 images in batches of 16: the resume at step 4 is inside an epoch's shuffled order and inside the 5 warm-up
    # steps, and the resumed run crosses both the next epoch and the end of the warm-up
    data = toy_data()
    a, _ = train_ddpm(spec(), cfg(8), tmp_path / "a", data=data, progress=False)
    train_ddpm(spec(), cfg(4), tmp_path / "b", data=data, progress=False)
    b, _ = train_ddpm(spec(), cfg(8), tmp_path / "b", data=data, progress=False, resume=True)
    assert a.losses == b.losses
    sa, sb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
    for part in ("model",):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), k
    for k, v in sa["ema"]["model"].items():
        assert torch.equal(v, sb["ema"]["model"][k]), k
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])


def test_cli_missing_dataset_names_apt_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDENGINE_FASHION_MNIST", str(tmp_path / "nowhere"))
    rc = main(["train", "ddpm", "--class-conditional", "--steps", "1", "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "dataset-fashion-mnist" in err


def test_cli_resume_missing_checkpoint(tmp_path, capsys):
    rc = main(["train", "ddpm", "--data", str(tmp_path), "--resume", "--out", str(tmp_path / "run"), "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no checkpoint to resume from" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_empty_folder_is_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["train", "ddpm", "--data", str(empty), "--out", str(tmp_path / "run"), "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(empty) in err


def test_cli_corrupt_image_is_named(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rc = main(["train", "ddpm", "--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "bad.png" in err


def test_cli_sample_unknown_model(tmp_path, capsys):
    rc = main(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no model at" in err and "fashion-mnist" in err


def test_unconditional_training_on_a_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        img = Image.new("RGB", (20, 24), (40 * i, 255 - 40 * i, 128))
        img.save(folder / f"{i}.png")
    s = DDPMSpec(data=str(folder), image_size=16, channels=3, unet=dataclasses.replace(TINY, in_channels=3))
    result, model = train_ddpm(s, cfg(4, batch_size=4), tmp_path / "run", progress=False)
    assert result.step == 4 and model.class_names is None and model.channels == 3
    imgs = PixelDDPM.load(tmp_path / "run" / "model").generate(None, n=2, sampler="ddim", steps=2, seed=0)
    assert imgs.shape == (2, 3, 16, 16)


def test_sample_of_an_unconditional_model_refuses_label_and_cfg(tmp_path, capsys):
    """`sample MODEL --label 3 --cfg 2` of a model without classes drew its grid as if neither was given."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (100 * i, 50, 128)).save(folder / f"{i}.png")
    s = DDPMSpec(data=str(folder), image_size=16, channels=3, unet=dataclasses.replace(TINY, in_channels=3))
    train_ddpm(s, cfg(1, batch_size=2), tmp_path / "run", progress=False)
    model = str(tmp_path / "run" / "model")
    for extra, words in ((["--label", "3"], "--label would"), (["--label", "3", "--cfg", "2"], "--label and --cfg")):
        rc = main(["sample", model, "--n", "2", "--steps", "1", *extra, "--out", str(tmp_path / "g.png")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "is an unconditional model (no classes)" in err and words in err
    assert not (tmp_path / "g.png").exists()
    assert main(["sample", model, "--n", "2", "--steps", "1", "--out", str(tmp_path / "g.png")]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cfg", "nan"], "--cfg must be a number in [0, 100], got nan"),  # once a black grid and exit 0
        (["--cfg", "1e308"], "--cfg must be a number in [0, 100]"),
        (["--cols", "-1"], "--cols must be in [1, --n = 2]"),  # once PIL's traceback
        (["--eta", "nan"], "--eta must be a number >= 0"),  # once a NaN grid blamed on --cfg
        (["--eta", "-1"], "--eta must be a number >= 0"),  # once noise of the wrong sign, and exit 0
        (["--out", "{tmp}"], "give an image file name"),  # a folder: once PIL's "unknown file extension"
        (["--out", "{tmp}/noext"], "give an image file name"),
    ],
)
def test_cli_sample_bad_arguments_are_one_line(tmp_path, capsys, extra, message):
    args = ["sample", "fashion-mnist", "--n", "2", "--steps", "1", "--out", str(tmp_path / "g.png")]
    rc = main([*args, *[x.replace("{tmp}", str(tmp_path)) for x in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "noext").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "ddpm", "--size", "64", "--steps", "2"], "fashion-mnist is 1-channel 32x32"),
        (["train", "ddpm", "--data", "{imgs}", "--class-conditional", "--steps", "2"], "needs labelled data"),
        (["train", "ddpm", "--data", "{imgs}", "--size", "0", "--steps", "2"], "size must be positive"),
        (["train", "controlnet", "--model", "{model}", "--data", "{imgs}", "--resolution", "0"], "must be positive"),
        (["train", "tiny-vae", "--model", "{model}", "--data", "{imgs}", "--eval-images", "0"], "eval images must be"),
        (["eval", "ddpm", "fashion-mnist", "--n", "4", "--steps", "2", "--cfg", "nan"], "--cfg must be a number"),
        (["eval", "emoji", "--n", "2", "--steps", "1", "--json", "{tmp}/afile/x.json"], "cannot write there"),
    ],
)
def test_training_and_eval_settings_are_one_line(tiny_sd1_folder, tmp_path, capsys, argv, message):
    """Each was a traceback (a plain ValueError from inside the trainer) or, for eval emoji's --json, an error
    after the whole evaluation; now one line before any work."""
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text("a square")
    (tmp_path / "afile").write_text("x")
    subs = {"{imgs}": str(imgs), "{model}": str(tiny_sd1_folder), "{tmp}": str(tmp_path)}
    args = [subs.get(x, x.replace("{tmp}", str(tmp_path))) for x in argv]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "out")]
    rc = main(["--threads", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_overwrite_removes_the_old_runs_sample_grids(tmp_path):
    """--overwrite removes the old run's outputs: its sample grids once stayed beside the new run's model."""
    out = tmp_path / "run"
    train_ddpm(spec(), cfg(4, batch_size=4, sample_every=2), out, data=toy_data(8), progress=False)
    old = sorted(p.name for p in out.glob("samples_*.png"))
    assert old, list(out.iterdir())
    train_ddpm(spec(), cfg(2, batch_size=4), out, data=toy_data(8), progress=False, overwrite=True, samples=False)
    assert not list(out.glob("samples_*.png")) and (out / "model").is_dir()


def test_resume_with_another_size_or_prediction_is_refused_unless_forced(tmp_path):
    """A conv U-Net has the same tensor shapes at another --size, --prediction or --beta-schedule, so `--resume`
    with one trained the epsilon model as a v-prediction one (or a 16-px one at 8 px) without a word."""
    from sdengine.io.checkpoint import CheckpointError

    data = toy_data()
    out = tmp_path / "run"
    train_ddpm(spec(), cfg(2), out, data=data, progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    for change, words in (
        ({"image_size": 8}, "--size 16, not 8"),
        ({"prediction": "v_prediction"}, "--prediction epsilon, not v_prediction"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "--beta-schedule linear, not squaredcos_cap_v2"),
        ({"data": "other"}, "--data toy, not other"),
    ):
        with pytest.raises(CheckpointError, match=words.replace("-", r"\-") + ".*--force-resume"):
            train_ddpm(dataclasses.replace(spec(), **change), cfg(3), out, data=data, progress=False, resume=True)
        assert (out / "checkpoint.pt").read_bytes() == before
    changed = dataclasses.replace(spec(), prediction="v_prediction")
    result, _ = train_ddpm(changed, cfg(3), out, data=data, progress=False, resume=True, force_resume=True)
    assert len(result.losses) == 3
