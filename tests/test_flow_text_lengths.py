"""ComfyUI's batching of a flow model's positive and negative texts (``sdengine.latent_sampling.sample_flow_latents``)
with a stand-in network that records the text lengths it is given: at cfg 1 the negative does not run and the
positive keeps its own length whatever the negative's; at cfg other than 1 texts of the same length run as one batch
and texts of different lengths run apart, each at its own length in a call of its own (ComfyUI's diffusion
transformers hold their text in a ``CONDRegular``, which batches equal shapes only), never repeated to a common
length. The sampled latents equal a loop written here that calls the network once per text."""

from __future__ import annotations

import pytest
import torch

from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule
from sdengine.diffusion.text_groups import text_length_groups, texts_concat
from sdengine.latent_sampling import (
    FlowModel,
    SkipLayerGuidance,
    TextCondition,
    make_noise,
    sample_flow_latents,
)

WIDTH = 8
SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


class JointNet:
    """A tiny joint attention (image tokens attend to image and text tokens together, as an MMDiT's): repeating
    the text tokens changes its output, so running texts apart is told from repeating them. Records the text
    length and row count of every call."""

    def __init__(self, skip: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.wq, self.wk, self.wv = (torch.randn(4, 8, generator=g) * 0.5 for _ in range(3))
        self.tk, self.tv = (torch.randn(WIDTH, 8, generator=g) * 0.5 for _ in range(2))
        self.out = torch.randn(8, 4, generator=g) * 0.3
        self.skip = skip
        self.seen: list[tuple[int, int]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *, crossattn: torch.Tensor, **_: object) -> torch.Tensor:
        self.seen.append((int(crossattn.shape[1]), int(x.shape[0])))
        b, c, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2)
        q = tok @ self.wq
        k = torch.cat([tok @ self.wk, crossattn @ self.tk], 1)
        v = torch.cat([tok @ self.wv, crossattn @ self.tv], 1)
        a = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, -1) @ v
        if self.skip:  # "a block left out" (skip-layer guidance's second network)
            a = a * 0.5
        y = (a @ self.out).transpose(1, 2).reshape(b, c, h, w)
        return y + 0.1 * x + 0.001 * t.reshape(-1, 1, 1, 1)


def _text(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, WIDTH, generator=torch.Generator().manual_seed(seed))


def _sample(net: JointNet, c: torch.Tensor, u: torch.Tensor, cfg: float, b: int = 1, **kw: object) -> torch.Tensor:
    skipping = kw.pop("skipping", None)
    model = FlowModel(net, FlowSchedule.sd3(3.0), 4, torch.device("cpu"), "stand-in", skipping=skipping)  # type: ignore[arg-type]
    with torch.inference_mode():
        return sample_flow_latents(model, [TextCondition({"crossattn": c})], [TextCondition({"crossattn": u})],
                                   torch.zeros(b, 4, 4, 4), SIGMAS, seed=3, cfg=cfg, **kw)  # type: ignore[arg-type]  # fmt: skip


def _reference(net: JointNet, c: torch.Tensor, u: torch.Tensor, cfg: float, b: int = 1, slg=None) -> torch.Tensor:
    """Euler on the same sigmas, the network called once per text (each at its own length), CFG as ComfyUI's;
    ``slg`` (network with blocks left out, scale, high, low): skip-layer guidance's term in its window."""
    den = FlowDenoiser(net, FlowSchedule.sd3(3.0))
    x = make_noise((b, 4, 4, 4), 3, "comfyui")
    with torch.inference_mode():
        for i in range(SIGMAS.shape[0] - 1):
            s, nxt = float(SIGMAS[i]), float(SIGMAS[i + 1])
            x0_c = den(x, s, crossattn=c.expand(b, -1, -1))
            x0 = x0_c if cfg == 1.0 else den(x, s, crossattn=u.expand(b, -1, -1))
            x0 = x0 + cfg * (x0_c - x0) if cfg != 1.0 else x0
            if slg is not None and slg[3] <= s <= slg[2]:
                skipped = FlowDenoiser(slg[0], FlowSchedule.sd3(3.0))
                x0 = x0 + slg[1] * (x0_c - skipped(x, s, crossattn=c.expand(b, -1, -1)))
            x = x + (nxt - s) * (x - x0) / s
    return x


def _run(pos_len: int, neg_len: int, cfg: float) -> list[int]:
    net = JointNet()
    _sample(net, _text(pos_len, 1), _text(neg_len, 2), cfg)
    return [n for n, _ in net.seen]


def test_cfg_1_keeps_the_positive_at_its_own_length():
    assert set(_run(651, 512, 1.0)) == {651}  # was 333,312: the lcm of the two


def test_comfyuis_text_batching_rules():
    """A U-Net's (CONDCrossAttn): equal, or their lcm at most 4 x the shorter; a flow model's (CONDRegular): equal."""
    assert texts_concat(77, 154, "lcm") and texts_concat(154, 231, "lcm") and not texts_concat(77, 385, "lcm")
    assert not texts_concat(651, 512, "lcm") and texts_concat(512, 512, "equal") and not texts_concat(77, 154, "equal")
    # calc_cond_batch: the first left takes what it can share a call with (77 and 385 cannot: 5 x)
    assert text_length_groups([77, 385, 154, 77], "lcm") == [[77, 154], [385]]
    assert text_length_groups([77, 385, 154], "equal") == [[77], [385], [154]]


@pytest.mark.parametrize(("pos_len", "neg_len"), [(651, 512), (154, 77), (3, 300)])
def test_cfg_other_than_1_runs_texts_of_other_lengths_apart(pos_len, neg_len):
    """A long positive beside a short negative (and the reverse) at cfg 4 runs, each text at its own length in a
    call of its own, and equals the loop that calls the network once per text (max abs on latents <= 1e-5); the
    batch of two latents keeps each row in its place."""
    for b in (1, 2):
        net = JointNet()
        c, u = _text(pos_len, 1), _text(neg_len, 2)
        got = _sample(net, c, u, 4.0, b)
        assert set(net.seen) == {(pos_len, b), (neg_len, b)}  # never one call of both, never a repeated text
        assert len(net.seen) == 2 * (SIGMAS.shape[0] - 1)
        want = _reference(JointNet(), c, u, 4.0, b)
        assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
        if pos_len % neg_len == 0:  # the negative repeated to the positive's length (the old batching) differs
            rep = u.repeat(1, pos_len // neg_len, 1)
            assert (_reference(JointNet(), c, rep, 4.0, b) - want).abs().max() > 1e-4


def test_equal_lengths_still_run_as_one_batch():
    net = JointNet()
    c, u = _text(77, 1), _text(77, 2)
    got = _sample(net, c, u, 4.0, 2)
    assert set(net.seen) == {(77, 4)}  # positive and negative rows of both latents: one call
    assert (got - _reference(JointNet(), c, u, 4.0, 2)).abs().max() <= 1e-5


def test_skip_layer_guidance_and_cfg_pp_with_texts_apart():
    """Skip-layer guidance's extra pass of the positive rows, and a CFG++ sampler at cfg 1 (its negative runs),
    with texts of other lengths: each text at its own length."""
    c, u = _text(40, 1), _text(9, 2)
    net, skipped = JointNet(), JointNet(skip=True)
    schedule = FlowSchedule.sd3(3.0)
    slg = SkipLayerGuidance((1,), 2.0, 0.0, 0.6)
    high, low = schedule.percent_to_sigma(0.0), schedule.percent_to_sigma(0.6)
    got = _sample(net, c, u, 4.0, skipping=lambda layers, single: skipped, skip_layer_guidance=slg)
    assert {n for n, _ in skipped.seen} == {40} and {n for n, _ in net.seen} == {40, 9}
    want = _reference(JointNet(), c, u, 4.0, slg=(JointNet(skip=True), 2.0, high, low))
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
    net = JointNet()
    _sample(net, c, u, 1.0, sampler="euler_cfg_pp")
    assert {n for n, _ in net.seen} == {40, 9} and all(rows == 1 for _, rows in net.seen)
