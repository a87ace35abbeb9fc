"""sdengine's Z-Image transformer against diffusers' ZImageTransformer2DModel on a tiny random config."""

from __future__ import annotations

import pytest
import torch

from _z_image_models import Z_TRANSFORMER, z_transformer
from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.z_image import ZImageConfig, ZImageTransformer


def _ours(ref) -> ZImageTransformer:
    model = ZImageTransformer(ZImageConfig.from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def _run_ref(ref, latent, t, caps):
    with torch.no_grad():
        out = ref(list(latent.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@pytest.mark.parametrize(("h", "w", "lengths"), [(8, 8, (7, 7)), (6, 10, (7, 40)), (12, 4, (33, 5))])
def test_transformer_matches_diffusers(h: int, w: int, lengths: tuple[int, int]) -> None:
    """Odd caption lengths (padded to 32 with the pad token), rows of different lengths in one batch (the shorter
    row's padding masked), non-square latents."""
    ref = z_transformer(seed=1)
    ours = _ours(ref)
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 16, h, w, generator=g)
    caps = [torch.randn(n, Z_TRANSFORMER["cap_feat_dim"], generator=g) for n in lengths]
    t = torch.tensor([0.3, 0.7865])
    want = _run_ref(ref, latent, t, caps)
    states = torch.zeros(2, max(lengths), Z_TRANSFORMER["cap_feat_dim"])
    mask = torch.zeros(2, max(lengths), dtype=torch.bool)
    for i, c in enumerate(caps):
        states[i, : len(c)], mask[i, : len(c)] = c, True
    with torch.no_grad():
        got = ours(latent, t, states, mask)
        alone = ours(latent[1:], t[1:], caps[1][None], None)
    assert got.shape == (2, 16, h, w)
    diff = (got - want).abs().max().item()
    assert diff < 5e-6, diff  # outputs up to ~2.6: float32 rounding
    assert (alone[0] - got[1]).abs().max().item() < 5e-6  # a row equals its run alone
    assert want.abs().max().item() > 1e-2  # not a degenerate output


def test_config_errors_are_one_line() -> None:
    base = dict(Z_TRANSFORMER)
    for bad, why in (
        ({"dim": 65}, "multiple of n_heads"),
        ({"axes_dims": [8, 12, 14]}, "adding up"),
        ({"n_kv_heads": 1}, "n_kv_heads"),
        ({"all_patch_size": [1]}, "not supported"),
        ({"n_layers": 10_000}, "out of range"),
        ({"siglip_feat_dim": 32}, "Omni"),
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"mystery": 1}, "unknown"),
    ):
        with pytest.raises(ConfigError, match=why) as e:
            ZImageConfig.from_diffusers({**base, **bad})
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not a Z-Image"):
        ZImageConfig.from_diffusers({"_class_name": "FluxTransformer2DModel"})


def test_bad_inputs_are_one_line() -> None:
    model = ZImageTransformer(ZImageConfig.from_diffusers(Z_TRANSFORMER)).eval()
    x = torch.zeros(1, 16, 8, 8)
    cap = torch.zeros(1, 5, 48)
    for args, why in (
        ((torch.zeros(1, 4, 8, 8), 0.5, cap), "latent"),
        ((torch.zeros(1, 16, 7, 8), 0.5, cap), "even"),
        ((x, 0.5, torch.zeros(1, 5, 47)), "cap_feats"),
        ((x, 0.5, cap, torch.tensor([[0, 1, 1, 1, 1]])), "cap_mask"),
        ((torch.zeros(1, 16, 130, 8), 0.5, cap), "too large"),
        ((x, 0.5, torch.zeros(1, 1600, 48)), "too long"),
    ):
        with pytest.raises(UsageError, match=why):
            model(*args)


def test_bfloat16_matches_diffusers_bfloat16() -> None:
    """The release's dtype: the same roundings as the reference (measured: equal outputs on the CPU)."""
    ref = z_transformer(seed=1)
    ours = _ours(ref).to(torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(2, 16, 8, 12, generator=g).bfloat16()
    caps = [torch.randn(n, Z_TRANSFORMER["cap_feat_dim"], generator=g).bfloat16() for n in (9, 40)]
    t = torch.tensor([0.3, 0.7])
    want = _run_ref(ref, latent, t, caps).float()
    states = torch.zeros(2, 40, Z_TRANSFORMER["cap_feat_dim"], dtype=torch.bfloat16)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    for i, c in enumerate(caps):
        states[i, : len(c)], mask[i, : len(c)] = c, True
    with torch.no_grad():
        got = ours(latent, t, states, mask)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() < 1e-3  # bfloat16's step at 2 is 1.6e-2
