"""FreeU on an SDXL U-Net: a tiny random U-Net of SDXL's layout (three levels, no attention at the first, text_time
conditioning) against diffusers' ``UNet2DConditionModel`` with ``enable_freeu`` on the same weights.

- ``freeu_rule`` "diffusers" version 1 is diffusers' own ``enable_freeu``.
- ``freeu_rule`` "width" (the authors', ComfyUI's, Forge's) picks the concatenations by the hidden state's width:
  in SDXL that is every one of the first up block (1280 wide there, 4x the first level's), the second block's all
  three (its first hidden state is still 4x wide, the others 2x) and the third block's first (2x). The oracle is
  diffusers' U-Net with its own FreeU step (``apply_freeu``: channel scaling and Fourier filter) handed the stage
  that width picks, so a stage taken from the wrong block, or a channel half scaled by the wrong factor, shows.
- Version 2 by width: the same, with the backbone factor the authors' later formula (written here from the paper's
  code description: 1 + (b - 1) x the hidden state's channel mean min-max normalised per sample).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sdengine.models.unet import UNet, UNetConfig
from sdengine.models.unet_sdxl import text_time_vector
from sdengine.nn.freeu import FreeU, freeu_applied, freeu_stage_count
from sdengine.weights.loading import build_on_meta

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
FACTORS = (1.3, 1.4, 0.9, 0.2)  # the authors' SDXL row
# SDXL base's layout (hub's sdxl-base-1.0 unet/config.json) at 1/10 the width: levels 32, 64, 128
SDXL_SHAPED = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4, 8],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 80,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "norm_num_groups": 8,
}


@pytest.fixture(scope="module")
def nets() -> tuple[Any, Any, UNetConfig]:
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**SDXL_SHAPED).eval()
    with torch.no_grad():  # perturb so zero-initialised output layers matter too
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = UNetConfig.from_diffusers(dict(ref.config))
    ours = build_on_meta(lambda: UNet(cfg), ref.state_dict(), name="unet").eval()
    return ref, ours, cfg


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(2, 4, 16, 16, generator=g),
        "t": torch.tensor([999.0, 17.0]),
        "ctx": torch.randn(2, 9, 80, generator=g),
        "pooled": torch.randn(2, 32, generator=g),
        "ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768.0, 1344, 16, 8, 832, 1216]]),
    }


def theirs(ref: Any, i: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        cond = {"text_embeds": i["pooled"], "time_ids": i["ids"]}
        return ref(i["x"], i["t"], encoder_hidden_states=i["ctx"], added_cond_kwargs=cond).sample


def ours_out(ours: Any, cfg: UNetConfig, i: dict[str, torch.Tensor], settings: FreeU | None) -> torch.Tensor:
    with torch.no_grad(), freeu_applied(ours, settings):
        return ours(
            i["x"], i["t"], encoder_hidden_states=i["ctx"], class_labels=text_time_vector(i["pooled"], i["ids"], cfg)
        )


def diffusers_freeu_by_width(monkeypatch: pytest.MonkeyPatch, base: int, version: int) -> list[tuple[int, int]]:
    """diffusers' up blocks call their FreeU step with the stage the width rule picks (0 at 4x ``base`` channels, 1
    at 2x, none else), version 2's backbone factor when asked; the (width, stage) of each call, in order."""
    from diffusers.models.unets import unet_2d_blocks
    from diffusers.utils.torch_utils import apply_freeu, fourier_filter

    calls: list[tuple[int, int]] = []

    def by_width(resolution_idx: int, h: torch.Tensor, skip: torch.Tensor, **kw: Any) -> Any:
        stage = {4 * base: 0, 2 * base: 1}.get(int(h.shape[1]), -1)
        calls.append((int(h.shape[1]), stage))
        if version == 1 or stage < 0:
            return apply_freeu(stage, h, skip, **kw)
        b, s = (kw["b1"], kw["s1"]) if stage == 0 else (kw["b2"], kw["s2"])
        mean = h.mean(dim=1, keepdim=True)
        lo = mean.amin(dim=(2, 3), keepdim=True)
        hi = mean.amax(dim=(2, 3), keepdim=True)
        half = h.shape[1] // 2
        h = h.clone()
        h[:, :half] = h[:, :half] * (1 + (b - 1) * (mean - lo) / (hi - lo))
        return h, fourier_filter(skip, threshold=1, scale=s)

    monkeypatch.setattr(unet_2d_blocks, "apply_freeu", by_width)
    return calls


def test_the_diffusers_rule_is_diffusers_enable_freeu_on_sdxl(nets, inputs):
    ref, ours, cfg = nets
    b1, b2, s1, s2 = FACTORS
    plain = theirs(ref, inputs)
    assert float((ours_out(ours, cfg, inputs, None) - plain).abs().max()) < TOL
    ref.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    try:
        want = theirs(ref, inputs)
    finally:
        ref.disable_freeu()
    settings = FreeU(*FACTORS, version=1, rule="diffusers")
    assert freeu_stage_count(ours, settings) == 6  # the first two up blocks' three concatenations each
    got = ours_out(ours, cfg, inputs, settings)
    err = float((got - want).abs().max())
    assert err < TOL, err
    assert float((want - plain).abs().max()) > 100 * TOL  # FreeU changed the output


@pytest.mark.parametrize("version", [1, 2])
def test_the_width_rule_picks_sdxls_blocks_by_width(nets, inputs, monkeypatch, version):
    ref, ours, cfg = nets
    b1, b2, s1, s2 = FACTORS
    calls = diffusers_freeu_by_width(monkeypatch, cfg.block_out_channels[0], version)
    ref.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    try:
        want = theirs(ref, inputs)
    finally:
        ref.disable_freeu()
    # SDXL's concatenations: 4x, 4x, 4x | 4x, 2x, 2x | 2x, 1x, 1x the first level's width
    assert calls == [(128, 0)] * 3 + [(128, 0), (64, 1), (64, 1), (64, 1), (32, -1), (32, -1)], calls
    settings = FreeU(*FACTORS, version=version, rule="width")
    assert freeu_stage_count(ours, settings) == 7
    got = ours_out(ours, cfg, inputs, settings)
    err = float((got - want).abs().max())
    assert err < TOL, err
    by_blocks = ours_out(ours, cfg, inputs, FreeU(*FACTORS, version=version, rule="diffusers"))
    assert float((by_blocks - want).abs().max()) > 100 * TOL  # the two rules differ on SDXL's layout
