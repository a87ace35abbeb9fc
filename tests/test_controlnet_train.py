"""``sdengine train controlnet``: a short run on a small folder lowers the loss (measured on fixed draws), the
exported diffusers-layout ControlNet loads back, and the pipeline generates with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from sdengine import pipeline  # noqa: E402


def _shapes_folder(root: Path, n: int = 4, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        a = np.full((size, size, 3), 30, np.uint8)
        x0, y0 = rng.integers(2, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        a[y0 : y0 + h, x0 : x0 + w] = rng.integers(120, 255, 3)
        Image.fromarray(a).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a square number {i}")
    return root


def _fixed_loss(net, unet, data, schedule, prediction: str, seed: int = 123, draws: int = 4) -> float:
    """Mean loss over fixed (latent sample, t, noise) draws: comparable before and after training."""
    from sdengine.diffusion.denoisers import diffusion_loss, prediction_target
    from sdengine.diffusion.schedules import q_sample

    g = torch.Generator().manual_seed(seed)
    acp = schedule.alphas_cumprod
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            x0 = data.latent_mean + data.latent_std * torch.randn(data.latent_mean.shape, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=g)
            x_t = q_sample(x0, t, noise, acp)
            kw = {}
            if net is not None:
                down, mid = net(x_t, t, data.control, encoder_hidden_states=data.text)
                kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            out = unet(x_t, t, encoder_hidden_states=data.text, **kw)
            total += diffusion_loss(out, prediction_target(prediction, x0, noise, acp[t]), prediction=prediction).item()
    return total / draws


def test_short_training_run_lowers_the_loss_and_generates(tmp_path, tiny_sd1_folder) -> None:
    from sdengine.cli import main
    from sdengine.control import load_controlnet, preprocess
    from sdengine.train.controlnet import ControlNetTrainSpec, prepare_data

    sd = tiny_sd1_folder
    data_dir = _shapes_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = [
        "train",
        "controlnet",
        "--model",
        str(sd),
        "--data",
        str(data_dir),
        "--condition",
        "canny",
        "--condition-option",
        "low=50",
        "--resolution",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--warmup",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--checkpoint-every",
        "20",
        "--empty-prompt-p",
        "0",
    ]
    assert main([*args, "--steps", "20"]) == 0
    assert (out / "checkpoint.pt").is_file()
    assert main([*args, "--steps", "40", "--resume"]) == 0  # continues from the shared loop's checkpoint
    folder = out / "controlnet"
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()

    pipe = pipeline.load_pipeline(sd, device="cpu")
    net = load_controlnet(folder, base=pipe.unet.config)
    spec = ControlNetTrainSpec(
        model=str(sd), data=str(data_dir), condition="canny", resolution=32, condition_options={"low": 50}
    )
    data = prepare_data(spec, pipe, torch.device("cpu"))
    before = _fixed_loss(None, pipe.unet, data, pipe.noise_schedule, pipe.prediction_type)
    after = _fixed_loss(net, pipe.unet, data, pipe.noise_schedule, pipe.prediction_type)
    assert after < 0.9 * before, (before, after)

    control = preprocess("canny", data_dir / "img0.png", low=50)
    kw = dict(steps=3, sampler="euler", schedule="normal", width=32, height=32, seed=1, progress=False)
    with_cn = pipe("a square number 0", controlnets=[(folder, control, 1.0)], **kw)
    plain = pipe("a square number 0", **kw)
    assert with_cn.arrays.shape == plain.arrays.shape == (1, 32, 32, 3)
    assert np.abs(with_cn.arrays - plain.arrays).mean() > 1e-4


def test_bad_training_input_is_one_line(tmp_path, capsys) -> None:
    from sdengine.cli import main

    rc = main(
        ["train", "controlnet", "--model", str(tmp_path / "nope"), "--data", str(tmp_path), "--condition", "depth"]
    )
    assert rc != 0
    err = capsys.readouterr().err
    assert "depth" in err and "valid" in err and len(err.strip().splitlines()) == 1
    rc = main(["train", "controlnet", "--model", "emoji", "--data", str(tmp_path), "--sample-prompt", "a cat"])
    err = capsys.readouterr().err  # once ignored without --sample-every
    assert rc == 2 and "--sample-prompt is the prompt of --sample-every N's samples" in err


def test_sample_every_writes_controlled_samples_and_keeps_the_random_stream(tmp_path, tiny_sd1_folder) -> None:
    from safetensors.torch import load_file

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters

    data_dir = _shapes_folder(tmp_path / "data")
    common = ["train", "controlnet", "--model", str(tiny_sd1_folder), "--data", str(data_dir), "--resolution", "32"]
    common += ["--batch-size", "2", "--lr", "2e-3", "--steps", "4", "--device", "cpu", "--checkpoint-every", "0"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    out = tmp_path / "sampled"
    assert main([*common, "--out", str(out), "--sample-every", "2"]) == 0
    files = sorted(p.name for p in (out / "samples").iterdir())
    assert files == ["step-000002.png", "step-000004.png"]
    for name in files:
        with Image.open(out / "samples" / name) as im:
            assert im.size == (32, 32)
            params = parse_parameters(im.info["parameters"])
        assert params["Prompt"] == "a square number 0" and params["Seed"] == "0"
        assert params["ControlNet 0"].startswith("Model: ")  # made through the ControlNet being trained
    weights = "controlnet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "plain" / weights), load_file(out / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_condition_or_model_is_refused_unless_forced(tmp_path, tiny_sd1_folder, capsys) -> None:
    """`--resume` with another --condition (or --model) of the same shape trained on without a word, the ControlNet
    then fitting neither; the checkpoint records both: one line naming the recorded one, nothing changed, and
    --force-resume (a moved model file, or meant) continues it."""
    from sdengine.cli import main
    from sdengine.train.checkpoint import load_checkpoint, model_identity

    data_dir = _shapes_folder(tmp_path / "data", n=2)
    out = tmp_path / "run"
    args = ["train", "controlnet", "--model", str(tiny_sd1_folder), "--data", str(data_dir), "--resolution", "32"]
    args += ["--batch-size", "1", "--warmup", "0", "--out", str(out), "--device", "cpu", "--checkpoint-every", "1"]
    assert main([*args, "--condition", "canny", "--steps", "1"]) == 0
    capsys.readouterr()
    before = (out / "checkpoint.pt").read_bytes()
    import shutil

    moved = shutil.copytree(tiny_sd1_folder, tmp_path / "moved-model")  # the same weights elsewhere
    (tmp_path / "link").symlink_to(tiny_sd1_folder, target_is_directory=True)  # the same folder by another name
    other_model = [*args, "--condition", "canny", "--steps", "2", "--resume"]
    other_model[other_model.index("--model") + 1] = str(moved)
    for again, recorded in (
        ([*args, "--condition", "softedge", "--steps", "2", "--resume"], "--condition canny, not softedge"),
        (other_model, f"--model {tiny_sd1_folder.resolve()}, not {moved}"),
    ):
        assert main(again) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and recorded in err[0] and "--force-resume" in err[0], err
        assert (out / "checkpoint.pt").read_bytes() == before
    assert model_identity(tmp_path / "link") == model_identity(tiny_sd1_folder)  # one model, however spelt
    assert main([*args, "--condition", "softedge", "--steps", "2", "--resume", "--force-resume"]) == 0
    assert int(load_checkpoint(out / "checkpoint.pt")["step"]) == 2
    assert main([*args, "--condition", "canny", "--steps", "3", "--force-resume"]) == 2
    assert "--force-resume continues a run: give it with --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_takes_only_the_init_the_run_started_from(tmp_path, tiny_sd1_folder, capsys) -> None:
    """On --resume the checkpoint's weights replace --init's, so another --init (or none for a run that started
    from one, or one for a run that started from the U-Net copy) would change nothing without a word: refused in
    one line naming the recorded start, nothing changed; the same command with --resume continues."""
    import shutil

    from sdengine.cli import main
    from sdengine.train.checkpoint import load_checkpoint

    data_dir = _shapes_folder(tmp_path / "data", n=2)
    args = ["train", "controlnet", "--model", str(tiny_sd1_folder), "--data", str(data_dir), "--resolution", "32"]
    args += ["--batch-size", "1", "--warmup", "0", "--device", "cpu", "--checkpoint-every", "1"]
    first = tmp_path / "first"
    assert main([*args, "--out", str(first), "--steps", "1"]) == 0
    init = first / "controlnet"
    other = shutil.copytree(init, tmp_path / "other")  # the same weights elsewhere: another start all the same
    out = tmp_path / "run"
    assert main([*args, "--out", str(out), "--steps", "1", "--init", str(init)]) == 0
    capsys.readouterr()
    before = (out / "checkpoint.pt").read_bytes()
    for again, recorded in (
        ([*args, "--out", str(out), "--resume"], f"--init {init.resolve()}, not without it"),
        ([*args, "--out", str(out), "--resume", "--init", str(other)], f"--init {init.resolve()}, not {other}"),
        ([*args, "--out", str(first), "--resume", "--init", str(init)], f"without --init, not {init.resolve()}"),
    ):
        assert main([*again, "--steps", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and recorded in err[0] and "resume" in err[0], err
        assert (out / "checkpoint.pt").read_bytes() == before
    assert main([*args, "--out", str(out), "--resume", "--init", str(init), "--steps", "2"]) == 0
    assert int(load_checkpoint(out / "checkpoint.pt")["step"]) == 2
