"""The emoji trainer end to end at toy size: stages run, resume skips finished stages, the export loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from _emoji_models import TINY_EMOJI_UNET, TINY_EMOJI_VAE
from sdengine.train.emoji import (
    HELD_OUT_SUBGROUP,
    TEXT_LENGTH,
    EmojiRecipe,
    EmojiTrainSpec,
    latent_scaling,
    train_emoji,
    training_indices,
)


@pytest.fixture(scope="module")
def small_dataset():
    from sdengine.data.emoji import EmojiDataset

    full = EmojiDataset()
    ds = copy.copy(full)
    fruit = [i for i, e in enumerate(full.entries) if e.subgroup == HELD_OUT_SUBGROUP][:3]
    idx = list(range(0, len(full), len(full) // 24))[:24] + fruit
    ds.entries = [full.entries[i] for i in idx]
    ds.images = F.interpolate(full.images[idx], size=16, mode="bilinear", antialias=True)
    ds.captions = [full.captions[i] for i in idx]
    return ds


def test_held_out_subgroup_is_left_out(small_dataset):
    keep = training_indices(small_dataset, HELD_OUT_SUBGROUP)
    assert len(keep) == len(small_dataset.entries) - 3
    assert all(small_dataset.entries[i].subgroup != HELD_OUT_SUBGROUP for i in keep)


def test_latent_scaling_makes_unit_spread():
    z = torch.randn(100, 4, 8, 8) * 3.7
    assert abs(float((z * latent_scaling(z)).std()) - 1.0) < 1e-3


def test_train_emoji_toy_run_exports_a_loadable_folder_and_resumes(tmp_path, small_dataset):
    recipe = EmojiRecipe(vae_steps=6, vae_batch=8, unet_steps=8, unet_batch=8, vae_warmup=2, unet_warmup=2,
                         mixed_precision="no", spec=EmojiTrainSpec(vae_crop=8))
    kw = dict(device="cpu", progress=False, dataset=small_dataset, unet_config=TINY_EMOJI_UNET,
              vae_config=TINY_EMOJI_VAE)
    summary = train_emoji(tmp_path / "run", recipe, **kw)
    assert summary["vae"]["steps"] == 6 and summary["unet"]["steps"] == 8
    assert summary["unet"]["images"] == len(small_dataset.entries) - 3
    model = tmp_path / "run" / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["sdengine"]["held_out_subgroup"] == HELD_OUT_SUBGROUP
    te = json.loads((model / "text_encoder" / "config.json").read_text())
    assert te["context_length"] == TEXT_LENGTH
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == summary["vae"]["scaling_factor"] != 1.0
    from safetensors.torch import load_file

    unet_sd = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in unet_sd.values())
    # Rerunning with the same recipe trains nothing more and exports the same weights.
    again = train_emoji(tmp_path / "run", recipe, **kw)
    assert again["unet"]["steps"] == 8
    unet_sd2 = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(unet_sd[k], unet_sd2[k]) for k in unet_sd)
    # Asking for more U-Net steps continues from the checkpoint.
    more = train_emoji(tmp_path / "run", EmojiRecipe(**{**recipe.__dict__, "unet_steps": 10}), **kw)
    assert more["unet"]["steps"] == 10
