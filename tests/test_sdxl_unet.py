"""SDXL U-Net (base and refiner layouts) against diffusers' UNet2DConditionModel on random weights."""

from __future__ import annotations

import pytest
import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.unet import UNet, UNetConfig
from sdengine.models.unet_sdxl import (
    SDXL_BASE,
    SDXL_REFINER,
    TINY_SDXL,
    TINY_SDXL_REFINER,
    text_time_vector,
    time_id_count,
)
from sdengine.weights.loading import build_on_meta

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5

# Written by hand in diffusers' terms (the shape of the hub's sdxl-base-1.0 / refiner-1.0 unet/config.json,
# scaled down), so the mapping from diffusers' names is what is tested, not a round trip.
TINY_BASE_DIFFUSERS = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 80,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "norm_num_groups": 8,
}
TINY_REFINER_DIFFUSERS = {
    **TINY_BASE_DIFFUSERS,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": 2,
    "cross_attention_dim": 48,
    "projection_class_embeddings_input_dim": 32 + 5 * 8,
}


def _reference(dcfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**dcfg).eval()
    with torch.no_grad():  # perturb so zero-initialised output layers matter too
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


@pytest.mark.parametrize(
    ("dcfg", "preset", "n_ids"),
    [(TINY_BASE_DIFFUSERS, TINY_SDXL, 6), (TINY_REFINER_DIFFUSERS, TINY_SDXL_REFINER, 5)],
    ids=["base", "refiner"],
)
def test_parity_with_diffusers(dcfg, preset, n_ids):
    ref = _reference(dcfg)
    cfg = UNetConfig.from_diffusers(dict(ref.config))
    assert cfg == preset
    ours = build_on_meta(lambda: UNet(cfg), ref.state_dict(), name="unet")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 9, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    # realistic numbers: sizes in pixels, crop offsets, (refiner) an aesthetic score
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024][:n_ids], [768.0, 1344, 16, 8, 832, 1216][:n_ids]])
    if n_ids == 5:
        ids[:, 4] = torch.tensor([6.0, 2.5])
    t = torch.tensor([999.0, 17.0])
    assert time_id_count(cfg, 32) == n_ids
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours(x, t, encoder_hidden_states=ctx, class_labels=text_time_vector(pooled, ids, cfg))
    err = (got - want).abs().max().item()
    assert err <= TOL, err
    assert want.abs().mean() > 0.01  # a real output, not zeros on both sides


def test_full_size_configs_map_both_ways():
    for cfg in (SDXL_BASE, SDXL_REFINER, TINY_SDXL, TINY_SDXL_REFINER):
        d = cfg.to_diffusers()
        assert d["addition_embed_type"] == "text_time"
        assert UNetConfig.from_diffusers(d) == cfg
    assert SDXL_BASE.to_diffusers()["transformer_layers_per_block"] == [1, 2, 10]


def test_parameter_count_of_the_full_size_base():
    with torch.device("meta"):
        n = sum(p.numel() for p in UNet(SDXL_BASE).parameters())
    assert n == 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0's U-Net


def test_bad_text_time_inputs():
    with pytest.raises(ConfigError, match="text_time"):
        UNetConfig.from_diffusers({**TINY_BASE_DIFFUSERS, "addition_time_embed_dim": None})
    with pytest.raises(ConfigError, match="one entry per level"):
        UNetConfig(**{**TINY_SDXL.__dict__, "transformer_layers_per_block": (1, 2, 3)})
    with pytest.raises(ValueError, match="add_embedding takes"):
        text_time_vector(torch.zeros(1, 32), torch.zeros(1, 5), TINY_SDXL)


@pytest.mark.slow
@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_medium_sdxl_parity_with_real_text_widths(refiner):
    """SDXL's topology at a fraction of the channels but with the real conditioning widths (2048/1280-wide text
    states, 1280 pooled + 256 per number), one forward at 32x32 latents."""
    import dataclasses

    from sdengine.models.unet_sdxl import SDXL_BASE, SDXL_REFINER

    if refiner:
        cfg = dataclasses.replace(SDXL_REFINER, block_out_channels=(64, 128, 192, 192), num_heads=(1, 2, 3, 3))
    else:
        cfg = dataclasses.replace(
            SDXL_BASE, block_out_channels=(64, 128, 256), num_heads=(1, 2, 4), transformer_layers_per_block=(1, 2, 4)
        )
    d = cfg.to_diffusers()
    d.pop("_class_name")
    ref = _reference(d, seed=3)
    ours = build_on_meta(lambda: UNet(UNetConfig.from_diffusers(dict(ref.config))), ref.state_dict(), name="unet")
    g = torch.Generator().manual_seed(4)
    n = 5 if refiner else 6
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(1, 1280, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024][:n]])
    with torch.no_grad():
        want = ref(x, 500, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours(x, 500, encoder_hidden_states=ctx, class_labels=text_time_vector(pooled, ids, cfg))
    err = (got - want).abs().max().item()
    print(f"medium SDXL {'refiner' if refiner else 'base'}: max abs {err:.2e}")
    assert err <= 1e-4


def _peak_rss_gb() -> float:
    # VmHWM: this process's peak resident memory (Linux); 0 where /proc is missing.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
def test_full_size_sdxl_base_forward_equals_diffusers():
    """The full-size SDXL base U-Net (2.57 B parameters, fp32, random weights) against diffusers, one forward.

    To keep the peak near one copy of the weights (10.3 GB), diffusers' U-Net is built (its own random
    initialisation, then perturbed so norms and biases are not at their 1/0 defaults), run once, and deleted
    while its state dict is kept; sdengine's U-Net is then built on the meta device and adopts those same
    tensors (``load_state_dict(assign=True)``: shared memory, no copy). Input: one 32x32 latent (a 256x256
    image), 77 text tokens of width 2048, the pooled 1280 vector and the six size/crop numbers.

    Measured alone on a 2-core CPU machine shared with other jobs (load average ~3), fp32, torch's default 2
    threads: max abs difference 1.8e-5 with outputs up to 2.85 (relative 6.2e-6), 98 s for the whole test
    (building, perturbing, both forwards), peak RSS 10.3 GiB (VmHWM; the weights alone are 9.6 GiB), so it
    needs no bf16. Tolerance: max abs <= 2e-5 x the output's largest magnitude (3x the measured error, room
    for other thread counts and kernels)."""
    import gc
    import time

    t0 = time.perf_counter()
    d = SDXL_BASE.to_diffusers()
    d.pop("_class_name")
    ref = diffusers.UNet2DConditionModel(**d).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():  # one parameter-sized temporary at a time
            p.add_(torch.randn(p.shape, generator=g), alpha=0.02)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ref == 2_567_463_684
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, 2048, generator=g)
    pooled = torch.randn(1, 1280, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    t = torch.tensor([500.0])
    with torch.inference_mode():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    sd = ref.state_dict()
    del ref
    gc.collect()
    ours = build_on_meta(lambda: UNet(SDXL_BASE), sd, name="unet")
    assert ours.conv_in.weight.data_ptr() == sd["conv_in.weight"].data_ptr()  # adopted, not copied
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    del sd
    with torch.inference_mode():
        got = ours(x, t, encoder_hidden_states=ctx, class_labels=text_time_vector(pooled, ids, SDXL_BASE))
    del ours
    gc.collect()
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(
        f"full-size SDXL base U-Net: max abs {err:.2e} (relative {err / scale:.2e}, output max {scale:.3f}), "
        f"{time.perf_counter() - t0:.0f} s, peak RSS {_peak_rss_gb():.1f} GB"
    )
    assert torch.isfinite(want).all() and want.abs().mean() > 0.01
    assert err <= 2e-5 * scale, (err, scale)
