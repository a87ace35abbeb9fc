"""``sdengine train tiny-vae``: a short distillation from a tiny random model's VAE lowers the loss, the exported
AutoencoderTiny folder loads back with exactly the returned model's weights and plugs into the pipeline, the
command prints the held-out PSNR and writes it beside the weights, and bad inputs are one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.models.vae import SD, VAEConfig
from sdengine.train.checkpoint import load_checkpoint
from sdengine.train.loop import TrainConfig
from sdengine.train.tiny_vae import (
    TinyVAETrainingError,
    TinyVAETrainSpec,
    prepare_data,
    psnr_8bit,
    split_indices,
    tiny_config_for,
    train_tiny_vae,
)
from sdengine.weights.tiny_vae_file import load_tiny_vae

SIZE = 16  # the tiny model's VAE is 2x: 8x8 latents


def _shapes_folder(root: Path, n: int = 10, size: int = SIZE) -> Path:
    """Coloured rectangles on a grey ground: structured images a decoder can learn quickly."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        a = np.full((size, size, 3), rng.integers(20, 90), np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2 + 1, 2)
        a[y0 : y0 + h, x0 : x0 + w] = rng.integers(120, 255, 3)
        Image.fromarray(a).save(root / f"img{i}.png")
    return root


def test_architecture_follows_taesd_with_one_level_per_factor_two() -> None:
    sd = tiny_config_for(SD)  # 8x: TAESD itself
    assert sd.decoder_channels == (64,) * 4 and sd.decoder_blocks == (3, 3, 3, 1)
    assert sd.encoder_channels == (64,) * 4 and sd.encoder_blocks == (1, 3, 3, 3)
    emoji = tiny_config_for(VAEConfig(block_out_channels=(32, 64, 128), norm_num_groups=16))  # 4x
    assert emoji.downscale_factor == 4 and emoji.decoder_blocks == (3, 3, 1) and emoji.encoder_blocks == (1, 3, 3)
    assert emoji.decoder_channels == (32,) * 3  # capped at the full VAE's full-resolution width
    wide = tiny_config_for(SD, 48, encoder=False)
    assert wide.decoder_channels == (48,) * 4 and not wide.has_encoder


def test_held_out_split_is_fixed_and_disjoint() -> None:
    train, held = split_indices(100, 256)
    assert held.numel() == 20 and train.numel() == 80  # at most a fifth
    assert not set(train.tolist()) & set(held.tolist())
    again_train, again_held = split_indices(100, 256)
    assert torch.equal(held, again_held) and torch.equal(train, again_train)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert float(psnr_8bit(x, x).min()) > 50  # identical images: the clamp's ceiling


def test_short_run_lowers_the_loss_and_exports_a_loadable_folder(tmp_path, tiny_sd1_folder) -> None:
    from sdengine import pipeline

    data = _shapes_folder(tmp_path / "data")
    out = tmp_path / "run"
    spec = TinyVAETrainSpec(model=str(tiny_sd1_folder), data=str(data), resolution=SIZE)
    cfg = TrainConfig(
        steps=40, batch_size=8, lr=3e-3, warmup_steps=1, ema_decay=0.0, seed=0, sample_every=20, checkpoint_every=0
    )
    got = train_tiny_vae(spec, cfg, out, device="cpu", progress=False)

    losses = got.result.losses
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)

    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_size < 1_000_000
    loaded = load_tiny_vae(out)
    assert loaded.config == got.model.config and loaded.config.downscale_factor == 2
    z = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), got.model.decode(z))  # the file holds the returned weights
        x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
        assert torch.equal(loaded.encode(x), got.model.encode(x))

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary == got.summary
    assert summary["steps"] == 40 and summary["held_out_images"] == 2 and summary["train_images"] == 8
    ev = summary["evaluation"]
    assert np.isfinite(ev["psnr_tiny_vs_full_db"]) and ev["psnr_tiny_vs_full_db"] > 10
    assert [h["step"] for h in summary["evaluation_history"]] == [20, 40]
    assert (out / "compare.png").is_file()

    pipe = pipeline.load_pipeline(tiny_sd1_folder, device="cpu", tiny_vae=out)
    assert pipe.tiny_vae is not None and pipe.tiny_vae.config == loaded.config


def test_command_prints_the_held_out_psnr(tmp_path, tiny_sd1_folder, capsys) -> None:
    from sdengine.cli import main

    data = _shapes_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "tiny-vae", "--model", str(tiny_sd1_folder), "--data", str(data), "--resolution", str(SIZE)]
    args += ["--out", str(out), "--steps", "4", "--batch-size", "4", "--warmup", "1", "--device", "cpu"]
    args += ["--latents", "sample", "--no-encoder", "--image-weight", "0.1", "--channels", "8", "--save-dtype", "fp32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out PSNR (2 images)" in printed and str(out) in printed
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    loaded = load_tiny_vae(out)
    assert loaded.encoder is None and loaded.config.decoder_channels == (8, 8)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["latents"] == "sample" and "psnr_tiny_vs_full_db" in summary["evaluation"]

    assert main(args) == 2  # a finished run is not replaced without --overwrite
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1


def test_keep_decoder_trains_only_an_encoder_beside_it(tmp_path, tiny_sd1_folder) -> None:
    from sdengine.models.tiny_vae import TinyAutoencoder
    from sdengine.weights.tiny_vae_file import save_tiny_vae

    data = _shapes_folder(tmp_path / "data")
    torch.manual_seed(3)
    decoder_only = TinyAutoencoder(
        tiny_config_for(load_pipeline_vae_config(tiny_sd1_folder), 8, encoder=False)  # the 2x model's layout
    )
    save_tiny_vae(decoder_only, tmp_path / "dec", dtype="fp32")
    out = tmp_path / "run"
    spec = TinyVAETrainSpec(
        model=str(tiny_sd1_folder),
        data=str(data),
        resolution=SIZE,
        channels=8,
        keep_decoder=str(tmp_path / "dec"),
        save_dtype="fp32",
    )
    cfg = TrainConfig(
        steps=30, batch_size=8, lr=3e-3, warmup_steps=1, ema_decay=0.9, seed=0, sample_every=15, checkpoint_every=0
    )
    got = train_tiny_vae(spec, cfg, out, device="cpu", progress=False)
    losses = got.result.losses
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses  # the encoder learns
    loaded = load_tiny_vae(out)
    assert loaded.encoder is not None and loaded.decoder is not None
    for name, t in decoder_only.decoder.state_dict().items():  # the decoder as it was, bit for bit (even with EMA)
        assert torch.equal(loaded.decoder.state_dict()[name].float(), t), name
    summary = got.summary
    assert summary["keep_decoder"] == str(tmp_path / "dec") and summary["encoder_parameters"] > 0
    assert [sorted(h) for h in summary["evaluation_history"]] == [["psnr_tiny_encoder_db", "step"]] * 2
    assert np.isfinite(summary["evaluation"]["psnr_tiny_encoder_db"])

    # the decoder the run started beside is its start: a resume without it, or with another, is refused before
    # any work (it once exported the new decoder beside the encoder, or dropped the kept one, without a word)
    import shutil

    from sdengine.train.checkpoint import CheckpointError

    before = (out / "checkpoint.pt").read_bytes()
    other = shutil.copytree(tmp_path / "dec", tmp_path / "dec2")
    more = dataclasses.replace(cfg, steps=31)
    kept = (tmp_path / "dec").resolve()
    for keep, recorded in ((None, f"--keep-decoder {kept}, not without it"), (str(other), f"{kept}, not {other}")):
        with pytest.raises(CheckpointError, match=recorded):
            train_tiny_vae(dataclasses.replace(spec, keep_decoder=keep), more, out, resume=True, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before

    with pytest.raises(TinyVAETrainingError, match="has no decoder"):
        encoder_only = TinyAutoencoder(
            dataclasses.replace(tiny_config_for(load_pipeline_vae_config(tiny_sd1_folder), 8), has_decoder=False)
        )
        save_tiny_vae(encoder_only, tmp_path / "enc")
        train_tiny_vae(
            dataclasses.replace(spec, keep_decoder=str(tmp_path / "enc")), cfg, tmp_path / "r2", progress=False
        )
    with pytest.raises(TinyVAETrainingError, match="cannot be combined with no encoder"):
        TinyVAETrainSpec(model="m", encoder=False, keep_decoder="x")
    # such a run makes no full-decoder targets for its training images (it never decodes)
    from sdengine import pipeline

    vae = pipeline.load_pipeline(tiny_sd1_folder, device="cpu").vae
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    with_targets = prepare_data(vae, images, flip=True, device=torch.device("cpu"))
    without = prepare_data(vae, images, flip=True, device=torch.device("cpu"), targets=False)
    assert with_targets.target.shape == (6, 3, SIZE, SIZE) and without.target.numel() == 0
    assert torch.equal(with_targets.mean, without.mean) and torch.equal(with_targets.images, without.images)


def load_pipeline_vae_config(folder):
    from sdengine import pipeline

    return pipeline.load_pipeline(folder, device="cpu").vae.config


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--steps", "0"], "steps"),
        (["--channels", "0"], "channels"),
        (["--batch-size", "0"], "batch size"),
        (["--image-weight", "-1"], "image weight"),
    ],
)
def test_bad_inputs_are_one_line(tmp_path, tiny_sd1_folder, capsys, extra, expected) -> None:
    from sdengine.cli import main

    rc = main(["train", "tiny-vae", "--model", str(tiny_sd1_folder), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_unknown_model_and_missing_data_are_one_line(tmp_path, tiny_sd1_folder, capsys) -> None:
    from sdengine.cli import main

    assert main(["train", "tiny-vae", "--model", "no-such-model", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-model" in err and len(err.splitlines()) == 1
    # a model that is not in the emoji format has no default data
    assert main(["train", "tiny-vae", "--model", str(tiny_sd1_folder), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data" in err and len(err.splitlines()) == 1


def test_spec_checks_its_values() -> None:
    with pytest.raises(TinyVAETrainingError, match="latents"):
        TinyVAETrainSpec(model="m", latents="median")  # type: ignore[arg-type]
    with pytest.raises(TinyVAETrainingError, match="save dtype"):
        TinyVAETrainSpec(model="m", save_dtype="int8")


def test_a_data_set_whose_targets_would_not_fit_is_refused_before_reading(tmp_path, tiny_sd1_folder, capsys) -> None:
    from sdengine.cli import main
    from sdengine.train.tiny_vae import data_bytes

    assert data_bytes(10, 512, flip=True) == 10 * 3 * 512 * 512 * (4 + 2 * 2 * 2)
    data = _shapes_folder(tmp_path / "shapes")
    args = ["train", "tiny-vae", "--model", str(tiny_sd1_folder), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, "--resolution", "16384", "--steps", "1"]) == 2  # ~90 GiB of targets for 10 images
    err = capsys.readouterr().err.strip()
    assert "GiB for the full decoder's targets" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
