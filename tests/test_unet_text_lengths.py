"""ComfyUI's batching of a U-Net's texts on the graph route (``sdengine.latent_sampling.sample_latents``): a U-Net's
text is a ``CONDCrossAttn``, so texts of different token counts share one call, repeated to their least common
multiple, where that is at most 4 x the shorter (cross-attention reads a text repeated whole as the text itself),
and run in calls of their own beyond that (once always repeated to the lcm, however long). A spy on the U-Net
records each call's text length and rows; the latents equal a reference that cuts every row's text back to its own
length and calls the U-Net once per length (max abs <= 1e-5)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import sdengine.latent_sampling as ls
from sdengine.latent_sampling import TextCondition, encode_text, sample_latents


@pytest.fixture(scope="module")
def emoji():
    from _live_server import shared_loader

    pipe = shared_loader("emoji", "cpu")
    words = ["a star", "a red heart", "a cat face", "a green tree", "a blue moon"]
    return pipe, [encode_text(pipe, w) for w in words]


def _joined(entries: list[TextCondition]) -> TextCondition:
    """ConditioningConcat of the entries: their token states one after the other."""
    return replace(
        entries[0], cond={**entries[0].cond, "crossattn": torch.cat([e.cond["crossattn"] for e in entries], 1)}
    )


class _Spy(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[tuple[int, int]] = []

    def forward(self, x, t, **kw):
        self.seen.append((int(kw["encoder_hidden_states"].shape[1]), int(x.shape[0])))
        return self.net(x, t, **kw)


class _ByLength(torch.nn.Module):
    """The reference: each row's text cut back to its own length (the shortest of ``lengths`` that it is a repeat
    of), the U-Net called once per length on the rows of that length, the outputs put back in row order."""

    def __init__(self, net: torch.nn.Module, lengths: list[int]) -> None:
        super().__init__()
        self.net, self.lengths = net, sorted(lengths)

    def forward(self, x, t, *, encoder_hidden_states, **kw):
        text = encoder_hidden_states
        own = [next(n for n in self.lengths if torch.equal(text[i : i + 1, :n].repeat(1, text.shape[1] // n, 1),
                                                           text[i : i + 1])) for i in range(x.shape[0])]  # fmt: skip
        out = torch.empty_like(x)
        for n in dict.fromkeys(own):
            idx = torch.tensor([i for i, m in enumerate(own) if m == n])
            rows = {k: v[idx] if isinstance(v, torch.Tensor) and v.shape[:1] == x.shape[:1] else v
                    for k, v in kw.items()}  # fmt: skip
            out[idx] = self.net(x[idx], t.reshape(-1)[idx], encoder_hidden_states=text[idx, :n], **rows)
        return out


def _sample(pipe, monkeypatch, positive, negative, *, per_row: list[int] | None = None, b: int = 2) -> tuple:
    spy = _Spy(pipe.unet if per_row is None else _ByLength(pipe.unet, per_row))
    with monkeypatch.context() as m:
        m.setattr(pipe, "unet", spy)
        if per_row is not None:  # one batch of every row, texts repeated to their lcm, which _ByLength cuts back
            m.setattr(ls, "texts_concat", lambda a, b, rule: True)
        with torch.inference_mode():
            out = sample_latents(pipe, positive, negative, torch.zeros(b, 4, 8, 8), seed=5, steps=3, cfg=4.0,
                                 sampler="euler", schedule="karras", seed_rule="comfyui")  # fmt: skip
    return out, set(spy.seen)


def test_texts_beyond_4x_run_apart_and_within_share_a_call(emoji, monkeypatch):
    pipe, texts = emoji
    n = texts[0].cond["crossattn"].shape[1]
    long5, long2 = _joined(texts), _joined(texts[:2])
    # 5 x the negative's length: lcm 5 n = 5 x the shorter, over ComfyUI's 4: two calls, each text at its length
    apart, seen = _sample(pipe, monkeypatch, [long5], [texts[1]])
    assert seen == {(5 * n, 2), (n, 2)}
    ref, _ = _sample(pipe, monkeypatch, [long5], [texts[1]], per_row=[n, 5 * n])
    assert (apart - ref).abs().max() <= 1e-5, (apart - ref).abs().max()
    # 2 x: one call of both, the negative repeated (as before)
    _, seen = _sample(pipe, monkeypatch, [long2], [texts[1]])
    assert seen == {(2 * n, 4)}


def test_conditioning_combine_of_texts_of_three_lengths(emoji, monkeypatch):
    """Two positives (ConditioningCombine) of n and 5 n tokens against a negative of n: the first pair shares a call,
    the second runs apart; the result equals the reference."""
    pipe, texts = emoji
    n = texts[0].cond["crossattn"].shape[1]
    got, seen = _sample(pipe, monkeypatch, [texts[0], _joined(texts)], [texts[2]], b=1)
    assert seen == {(n, 2), (5 * n, 1), (n, 1)}
    ref, _ = _sample(pipe, monkeypatch, [texts[0], _joined(texts)], [texts[2]], per_row=[n, 5 * n], b=1)
    assert (got - ref).abs().max() <= 1e-5, (got - ref).abs().max()
