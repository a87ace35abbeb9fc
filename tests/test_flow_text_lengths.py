"""ComfyUI's batching of a flow model's positive and negative texts (``sdengine.latent_sampling.sample_flow_latents``)
with a stand-in network that records the text lengths it is given: at cfg 1 the negative does not run and the
positive keeps its own length whatever the negative's; at cfg other than 1 lengths within ComfyUI's concat rule
(their least common multiple at most 4 x the shorter) are repeated to that multiple in one batch, and lengths ComfyUI
would run apart are one line."""

from __future__ import annotations

import pytest
import torch

from sdengine.diffusion.flow import FlowSchedule
from sdengine.errors import SdengineError
from sdengine.latent_sampling import FlowModel, TextCondition, sample_flow_latents


def _run(pos_len: int, neg_len: int, cfg: float) -> list[int]:
    seen: list[int] = []

    def net(x: torch.Tensor, t: torch.Tensor, *, crossattn: torch.Tensor, **_: object) -> torch.Tensor:
        seen.append(int(crossattn.shape[1]))
        return 0.5 * x + crossattn.mean() * 0.01

    model = FlowModel(net, FlowSchedule.sd3(3.0), 4, torch.device("cpu"), "stand-in")
    pos = [TextCondition({"crossattn": torch.ones(1, pos_len, 8)})]
    neg = [TextCondition({"crossattn": torch.zeros(1, neg_len, 8)})]
    with torch.inference_mode():
        sample_flow_latents(model, pos, neg, torch.zeros(1, 4, 4, 4), torch.tensor([1.0, 0.5, 0.0]), seed=1, cfg=cfg)
    return seen


def test_cfg_1_keeps_the_positive_at_its_own_length():
    assert set(_run(651, 512, 1.0)) == {651}  # was 333,312: the lcm of the two


def test_cfg_other_than_1_batches_within_comfyuis_rule_and_refuses_beyond():
    assert set(_run(154, 77, 4.0)) == {154}  # lcm 154 = 2 x 77: one batch, the negative repeated
    with pytest.raises(SdengineError) as e:
        _run(651, 512, 4.0)
    message = str(e.value)
    assert "651 and 512 tokens" in message and "\n" not in message, message
