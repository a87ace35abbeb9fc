"""``sdengine demo``: the four emoji pictures with their per-image PNGs (on a tiny random emoji folder, 2 steps),
skipped parts when the ControlNet / LoRA assets are missing, and the Fashion-MNIST fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from _emoji_models import TINY_EMOJI_UNET
from sdengine import demo
from sdengine.cli import main
from sdengine.metadata import read_png_parameters

SIZE = 16  # the tiny folder's image size
CELL = SIZE * demo.SCALE


def _tiny_controlnet(dst: Path) -> Path:
    from sdengine.control import save_controlnet
    from sdengine.models.controlnet import ControlNet
    from sdengine.models.unet import UNet

    torch.manual_seed(1)
    # a 2x hint encoder: the tiny VAE's factor (16x16 images, 8x8 latents)
    net = ControlNet.from_unet(UNet(TINY_EMOJI_UNET), conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for p in net.controlnet_down_blocks.parameters():
            p.normal_(0, 0.1)  # zero convs made non-zero, so that the ControlNet changes the image
    return save_controlnet(net, dst)


def _tiny_lora(dst: Path) -> Path:
    """A random kohya LoRA on the tiny U-Net's cross-attention key/value layers."""
    from sdengine.models.unet import UNet
    from sdengine.weights.lora import kohya_name, lora_targets

    g = torch.Generator().manual_seed(2)
    sd = {}
    for name, m in lora_targets(UNet(TINY_EMOJI_UNET)):
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            key = kohya_name("unet", name)
            sd[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g) * 0.1
            sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.1
            sd[f"{key}.alpha"] = torch.tensor(2.0)
    assert sd
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst), metadata={"ss_network_dim": "2", "ss_network_alpha": "2"})
    return dst


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_emoji_folder):
    root = tmp_path_factory.mktemp("demo_assets")
    model = tiny_emoji_folder
    return {
        "model": model,
        "controlnet": _tiny_controlnet(root / "emoji-controlnet-canny"),
        "lora": _tiny_lora(root / "loras" / "emoji-fruit.safetensors"),
    }


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    lines: list[str] = []
    res = demo.run_demo(
        out,
        model=assets["model"],
        device="cpu",
        steps=2,
        progress=False,
        controlnet=assets["controlnet"],
        lora=assets["lora"],
        echo=lines.append,
    )
    return out, res, lines


def test_slug():
    assert demo.slug("Sun behind cloud!") == "sun-behind-cloud"
    assert demo.slug("  ") == "image"
    assert len({demo.slug(p) for p in demo.GRID_PROMPTS}) == len(demo.GRID_PROMPTS)


def test_captioned_grid_size_and_captions():
    tiles = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    g = demo.captioned_grid(tiles, ["a", "a much longer caption that has to wrap", "c"], 2, scale=3, pad=4)
    assert g.size[0] == 4 + 2 * (24 + 4)
    assert g.getpixel((4, 4)) == (255, 0, 0)
    assert g.getpixel((4 + 28, 4)) == (0, 128, 0)
    with pytest.raises(ValueError, match="captions"):
        demo.captioned_grid(tiles, ["a"], 2)


def test_demo_writes_the_four_pictures_and_the_images(full_run):
    out, res, lines = full_run
    assert not res.fallback and not res.skipped
    for name, cols in (("emoji_grid.png", 4), ("img2img.png", 2), ("controlnet.png", 5), ("lora.png", 2)):
        with Image.open(out / name) as im:
            assert im.size[0] == 6 + cols * (CELL + 6), name
        assert out / name in res.files
    for prompt in demo.GRID_PROMPTS:
        p = out / "emoji" / f"{demo.slug(prompt)}.png"
        with Image.open(p) as im:
            assert im.size == (SIZE, SIZE)
        text = read_png_parameters(p)
        assert text is not None and text.startswith(prompt + "\n") and "Steps: 2," in text and "Seed: 0," in text
    assert "Denoising strength: 0.6" in read_png_parameters(out / "img2img_result.png")
    assert "ControlNet 0: " in read_png_parameters(out / "controlnet_result.png")
    lora_text = read_png_parameters(out / "lora_result.png")
    assert "<lora:emoji-fruit:1>" in lora_text and "Lora hashes" in lora_text
    # one line per file written, then the total
    assert len(lines) == len(res.files) + 1
    assert all(str(f) in line for f, line in zip(res.files, lines, strict=False))
    assert lines[-1].startswith(f"demo: {len(res.files)} files in ")
    assert set(res.timings) >= {"load", "grid", "img2img", "controlnet", "lora"}


def test_controlnet_and_lora_change_the_image(full_run):
    out, _, _ = full_run
    import numpy as np

    def cells(name: str, n: int) -> list[np.ndarray]:
        a = np.asarray(Image.open(out / name).convert("RGB"))
        return [a[6 : 6 + CELL, 6 + k * (CELL + 6) : 6 + k * (CELL + 6) + CELL] for k in range(n)]

    _, plain, half, one, more = cells("controlnet.png", 5)
    for with_cn in (half, one, more):
        assert np.abs(plain.astype(int) - with_cn).max() > 0
    assert np.abs(half.astype(int) - more).max() > 0  # the weight matters
    a = np.asarray(Image.open(out / "controlnet.png").convert("RGB"))
    assert a.shape[0] > 2 * CELL  # two rows: the prompt, then the empty prompt
    plain, with_lora = cells("lora.png", 2)
    assert np.abs(plain.astype(int) - with_lora).max() > 0


def test_missing_controlnet_and_lora_are_skipped(assets, tmp_path):
    lines: list[str] = []
    missing_cn, missing_lora = tmp_path / "no-controlnet", tmp_path / "no-lora.safetensors"
    res = demo.run_demo(
        tmp_path / "out",
        model=assets["model"],
        device="cpu",
        steps=2,
        progress=False,
        controlnet=missing_cn,
        lora=missing_lora,
        echo=lines.append,
    )
    assert (tmp_path / "out" / "emoji_grid.png").is_file() and (tmp_path / "out" / "img2img.png").is_file()
    assert not (tmp_path / "out" / "controlnet.png").exists() and not (tmp_path / "out" / "lora.png").exists()
    assert f"demo: skipping controlnet.png: the ControlNet {missing_cn} is missing" in lines
    assert f"demo: skipping lora.png: the LoRA {missing_lora} is missing" in lines
    assert len(res.skipped) == 2


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_fashion_mnist_fallback(tmp_path):
    lines: list[str] = []
    res = demo.run_demo(
        tmp_path, model=tmp_path / "no-such-model", device="cpu", steps=2, progress=False, echo=lines.append
    )
    assert res.fallback and res.files == [tmp_path / "fashion_mnist_grid.png"]
    assert lines[0].startswith("demo: the emoji model is not at") and "Fashion-MNIST grid instead" in lines[0]
    with Image.open(tmp_path / "fashion_mnist_grid.png") as im:
        assert im.size[1] == 10 * (28 * 3 + 2) + 2  # ten classes, one row each


def test_cli_demo_builtin_emoji(assets, tmp_path, monkeypatch, capsys):
    """`sdengine demo --out DIR` on the built-in name (pointed at the tiny folder, assets missing)."""
    monkeypatch.setitem(demo.BUILTIN_SD, "emoji", assets["model"])
    monkeypatch.setattr(demo, "CONTROLNET_ASSET", tmp_path / "absent")
    monkeypatch.setattr(demo, "LORA_ASSET", assets["lora"])
    rc = main(["demo", "--out", str(tmp_path / "o"), "--steps", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "emoji_grid.png" in printed and "lora.png" in printed and "skipping controlnet.png" in printed
    assert (tmp_path / "o" / "lora.png").is_file()


def test_cli_demo_fallback_when_emoji_not_shipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(demo.BUILTIN_SD, "emoji", tmp_path / "not-trained")
    rc = main(["demo", "--out", str(tmp_path), "--steps", "2", "--device", "cpu"])
    assert rc == 0
    assert "Fashion-MNIST grid instead" in capsys.readouterr().out
    assert (tmp_path / "fashion_mnist_grid.png").is_file()
