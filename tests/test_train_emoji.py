"""The emoji trainer end to end at toy size: stages run, resume skips finished stages, the export loads."""

from __future__ import annotations

import json

import pytest
import torch

from _emoji_models import TINY_EMOJI_UNET, TINY_EMOJI_VAE
from sdengine.models.unet import UNet
from sdengine.train.checkpoint import load_checkpoint
from sdengine.train.emoji import (
    HELD_OUT_SUBGROUP,
    TEXT_LENGTH,
    EmojiRecipe,
    EmojiTrainError,
    EmojiTrainSpec,
    checkpoint_has_pooled,
    latent_scaling,
    train_emoji,
    training_indices,
)


@pytest.fixture(scope="module")
def small_dataset(emoji_subset):
    return emoji_subset(24)


def test_held_out_subgroup_is_left_out(small_dataset):
    keep = training_indices(small_dataset, HELD_OUT_SUBGROUP)
    assert len(keep) == len(small_dataset.entries) - 3
    assert all(small_dataset.entries[i].subgroup != HELD_OUT_SUBGROUP for i in keep)


def test_latent_scaling_makes_unit_spread():
    z = torch.randn(100, 4, 8, 8) * 3.7
    assert abs(float((z * latent_scaling(z)).std()) - 1.0) < 1e-3


def test_train_emoji_toy_run_exports_a_loadable_folder_and_resumes(tmp_path, small_dataset):
    recipe = EmojiRecipe(
        vae_steps=6,
        vae_batch=8,
        unet_steps=8,
        unet_batch=8,
        vae_warmup=2,
        unet_warmup=2,
        mixed_precision="no",
        spec=EmojiTrainSpec(vae_crop=8),
        unet_pooled_from=0,
    )
    kw = dict(
        device="cpu", progress=False, dataset=small_dataset, unet_config=TINY_EMOJI_UNET, vae_config=TINY_EMOJI_VAE
    )
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
    assert "class_embedding.linear_1.weight" in unet_sd  # the pooled sentence vector from step 0
    # Rerunning with the same recipe trains nothing more and exports the same weights.
    again = train_emoji(tmp_path / "run", recipe, **kw)
    assert again["unet"]["steps"] == 8
    unet_sd2 = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(unet_sd[k], unet_sd2[k]) for k in unet_sd)
    # Asking for more U-Net steps continues from the checkpoint.
    more = train_emoji(tmp_path / "run", EmojiRecipe(**{**recipe.__dict__, "unet_steps": 10}), **kw)
    assert more["unet"]["steps"] == 10
    # More VAE steps after the U-Net stage began would change the latents it learnt: refused, nothing changed
    # (once the VAE trained on silently and was exported with the old U-Net).
    before = (tmp_path / "run" / "vae" / "checkpoint.pt").read_bytes()
    with pytest.raises(EmojiTrainError, match="the U-Net stage started on the VAE of step 6"):
        train_emoji(tmp_path / "run", EmojiRecipe(**{**recipe.__dict__, "vae_steps": 8, "unet_steps": 10}), **kw)
    assert (tmp_path / "run" / "vae" / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_pooled_phase_starts_from_the_token_only_model_exactly(tmp_path, small_dataset):
    """unet_pooled_from: the U-Net learns from token states alone, then gets the zero-initialised pooled
    projection; at the switch the upgraded model computes what the token-only one did, and training
    goes on from the same optimizer moments."""
    import dataclasses

    recipe = EmojiRecipe(
        vae_steps=4,
        vae_batch=8,
        unet_steps=4,
        unet_batch=8,
        vae_warmup=2,
        unet_warmup=2,
        mixed_precision="no",
        spec=EmojiTrainSpec(vae_crop=8),
        unet_pooled_from=4,
    )
    kw = dict(
        device="cpu", progress=False, dataset=small_dataset, unet_config=TINY_EMOJI_UNET, vae_config=TINY_EMOJI_VAE
    )
    ckpt = tmp_path / "run" / "unet" / "checkpoint.pt"
    train_emoji(tmp_path / "run", recipe, **kw)  # the recipe ends at the switch: token-only model
    assert not checkpoint_has_pooled(ckpt)
    before = load_checkpoint(ckpt)
    tokens_only = dataclasses.replace(TINY_EMOJI_UNET, projection_class_embeddings_input_dim=None)
    old = UNet(tokens_only).eval()
    old.load_state_dict(before["model"])

    more = dataclasses.replace(recipe, unet_steps=6)
    summary = train_emoji(tmp_path / "run", more, **kw)
    assert summary["unet"]["steps"] == 6 and checkpoint_has_pooled(ckpt)
    after = load_checkpoint(ckpt)
    assert torch.count_nonzero(after["model"]["class_embedding.linear_2.weight"]) > 0  # zero at the switch, then learnt
    assert (tmp_path / "run" / "text_pooled.pt").is_file()
    # Every old parameter kept its optimizer moments' shape and went on training.
    assert len(after["optimizer"]["state"]) == len(list(UNet(TINY_EMOJI_UNET).parameters()))

    # The upgrade alone (rebuilt here from the step-4 checkpoint) is exact.
    from sdengine.train.checkpoint import save_checkpoint
    from sdengine.train.emoji import add_pooled_projection

    path = tmp_path / "copy.pt"
    save_checkpoint(path, before)
    add_pooled_projection(path, tokens_only, TINY_EMOJI_UNET, seed=0)
    up = load_checkpoint(path)
    new = UNet(TINY_EMOJI_UNET).eval()
    new.load_state_dict(up["model"])
    g = torch.Generator().manual_seed(0)
    x, ctx, vec = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 384, generator=g), torch.randn(2, 384)
    with torch.no_grad():
        assert torch.equal(
            new(x, 300, encoder_hidden_states=ctx, class_labels=vec), old(x, 300, encoder_hidden_states=ctx)
        )
    assert torch.count_nonzero(new.class_embedding.linear_1.weight) > 0
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in new.parameters() if p.ndim >= 2]},
            {"params": [p for p in new.parameters() if p.ndim < 2]},
        ]
    )
    opt.load_state_dict(up["optimizer"])  # the loop's grouping: loads without a size mismatch
    with pytest.raises(ValueError, match="token-states-only"):
        add_pooled_projection(path, tokens_only, TINY_EMOJI_UNET, seed=0)  # already upgraded


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"unet_batch": 0}, "batch size must be >= 1"),
        ({"unet_lr": 0.0}, "learning rate must be a finite number > 0"),
        ({"unet_steps": -1}, "steps must be >= 1"),
        ({"unet_pooled_from": -1}, "--pooled-from must be a step >= 0"),
    ],
)
def test_a_bad_unet_setting_fails_before_the_vae_stage(tmp_path, small_dataset, bad, message):
    """Once the whole VAE stage trained (an hour at the shipped settings) before the U-Net's settings were read."""
    base = dict(vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, unet_pooled_from=1, mixed_precision="no")
    recipe = EmojiRecipe(**{**base, **bad}, spec=EmojiTrainSpec(vae_crop=8))
    kw = dict(
        device="cpu", progress=False, dataset=small_dataset, unet_config=TINY_EMOJI_UNET, vae_config=TINY_EMOJI_VAE
    )
    with pytest.raises(Exception, match=message):
        train_emoji(tmp_path / "run", recipe, **kw)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
