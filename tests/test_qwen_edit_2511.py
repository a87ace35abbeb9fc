"""Qwen-Image-Edit-2511: its transformer's ``zero_cond_t`` (the reference images' tokens modulated and gated by the
timestep-0 embedding, the generated latent's tokens and the text by the step's), against diffusers'
``QwenImageTransformer2DModel(zero_cond_t=True)`` and, end to end, ``QwenImageEditPlusPipeline`` on a tiny random
2511 folder (a 2509 folder of tests/_qwen_edit_models.py whose transformer config sets ``zero_cond_t``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _qwen_models import QWEN_TRANSFORMER, qwen_transformer
from sdengine.models.flux import pack_latents
from sdengine.models.qwen_image import QwenImageConfig, QwenImageTransformer


def _ours(ref) -> QwenImageTransformer:
    model = QwenImageTransformer(QwenImageConfig.from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def test_zero_cond_t_transformer_matches_diffusers() -> None:
    """Two rows at different timesteps, a masked shorter prompt, two reference latents of other sizes."""
    ref = qwen_transformer(seed=5, zero_cond_t=True)
    ours = _ours(ref)
    assert ours.config.zero_cond_t
    g = torch.Generator().manual_seed(11)
    latent = torch.randn(2, 16, 6, 8, generator=g)
    refs = [torch.randn(2, 16, 4, 10, generator=g), torch.randn(2, 16, 8, 4, generator=g)]
    states = torch.randn(2, 7, QWEN_TRANSFORMER["joint_attention_dim"], generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    t = torch.tensor([700.0, 213.5])
    shapes = [[(1, 3, 4), (1, 2, 5), (1, 4, 2)]] * 2
    with torch.no_grad():
        packed = torch.cat([pack_latents(latent), *(pack_latents(r) for r in refs)], dim=1)
        want = ref(hidden_states=packed, encoder_hidden_states=states, encoder_hidden_states_mask=mask,
                   timestep=t / 1000, img_shapes=shapes, return_dict=False)[0][:, : 3 * 4]  # fmt: skip
        got = ours(latent, t, states, mask, reference=refs)
        # the same weights without zero_cond_t: the reference tokens' modulation changes the result
        plain = QwenImageTransformer(QwenImageConfig.from_diffusers({**dict(ref.config), "zero_cond_t": False}))
        plain.load_state_dict(ref.state_dict(), strict=True)
        other = plain.eval()(latent, t, states, mask, reference=refs)
        # without a reference every token is the generated image's: zero_cond_t changes nothing
        alone, alone_plain = ours(latent, t, states, mask), plain(latent, t, states, mask)
    diff = (pack_latents(got) - want).abs().max().item()
    assert diff < 1e-4, diff
    assert (got - other).abs().max().item() > 1e-3
    assert torch.equal(alone, alone_plain)


def test_zero_cond_t_must_be_a_bool() -> None:
    from sdengine.models.config_checks import ConfigError

    with pytest.raises(ConfigError, match="zero_cond_t='yes' is not true/false"):
        QwenImageConfig.from_diffusers({**QWEN_TRANSFORMER, "zero_cond_t": "yes"})
