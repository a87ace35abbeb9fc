"""Rows whose texts have different token counts, run as ComfyUI's sampler batches conditionings: texts that can
share a model call (:func:`texts_concat`) share one, the others run in calls of their own, and every output goes
back to its row. The ComfyUI route's flow and U-Net samplers (:mod:`sdengine.latent_sampling`) and FLUX.1 Redux's
longer positive under true CFG (:mod:`sdengine.pipeline.flux`) run their networks through :func:`run_text_groups`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import UsageError

TEXT_CONCAT_RULES = ("equal", "lcm")


def texts_concat(a: int, b: int, rule: str) -> bool:
    """Whether texts of ``a`` and ``b`` tokens share one model call under ComfyUI's rule for the model's text
    conditioning: ``"lcm"``, a U-Net's (its ``CONDCrossAttn.can_concat``: equal, or repeated to their least common
    multiple where that is at most 4 x the shorter); ``"equal"``, a diffusion transformer's (SD3, Flux, FLUX.2,
    Chroma, Qwen-Image, Z-Image hold their text in a ``CONDRegular``, which batches equal shapes only)."""
    if rule not in TEXT_CONCAT_RULES:
        raise UsageError(f"unknown text batching rule {rule!r}; use one of {', '.join(TEXT_CONCAT_RULES)}")
    if a == b:
        return True
    return rule == "lcm" and math.lcm(a, b) // min(a, b) <= 4


def text_length_groups(lengths: Sequence[int], rule: str) -> list[list[int]]:
    """ComfyUI's calc_cond_batch over conditionings of these text lengths: the first one left takes every other
    left that it can share a call with (:func:`texts_concat`), and so on; one model call per group (each text
    repeated to the group's least common multiple)."""
    left = list(dict.fromkeys(int(n) for n in lengths))
    groups: list[list[int]] = []
    while left:
        group = [n for n in left if texts_concat(left[0], n, rule)]
        left = [n for n in left if n not in group]
        groups.append(group)
    return groups


def run_text_groups(
    net: Any, x: Tensor, t: Tensor, *, crossattn: Tensor, text_len: Tensor, rule: str = "equal", **kw: Any
) -> Tensor:
    """``net(x, t, crossattn=..., **kw)`` for rows whose texts are zero-padded to the longest in ``crossattn``,
    ``text_len`` (N,) each row's own count: the rows split into :func:`text_length_groups`, one call per group
    (each row's text cut to its own count and repeated to the group's least common multiple), every output put back
    in its row. Row arguments (tensors of N rows, ``t``, tuples of N such as ``row_kinds``) follow their rows;
    others go to every call as they are."""
    n = x.shape[0]
    lengths = [int(v) for v in text_len.reshape(-1).tolist()]
    if len(lengths) != n or crossattn.shape[0] != n:
        raise UsageError(f"{len(lengths)} text lengths and {crossattn.shape[0]} texts for {n} rows")

    def rows(v: Any, idx: list[int], index: Tensor) -> Any:
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n:
            return v.index_select(0, index.to(v.device))
        if isinstance(v, tuple | list) and len(v) == n:  # row_kinds
            return type(v)(v[i] for i in idx)
        return v

    out: Tensor | None = None
    for group in text_length_groups(lengths, rule):
        idx = [i for i, m in enumerate(lengths) if m in group]
        span = functools.reduce(math.lcm, group)
        text = torch.cat([crossattn[i : i + 1, : lengths[i]].repeat(1, span // lengths[i], 1) for i in idx])
        if len(idx) == n:  # one call for every row: as a batch of one length
            return net(x, t, crossattn=text, **kw)
        index = torch.tensor(idx, dtype=torch.long)
        got = net(rows(x, idx, index), rows(t, idx, index), crossattn=text,
                  **{k: rows(v, idx, index) for k, v in kw.items()})  # fmt: skip
        if out is None:
            out = got.new_empty((n, *got.shape[1:]))
        out.index_copy_(0, index.to(got.device), got)
    assert out is not None
    return out


__all__ = ["TEXT_CONCAT_RULES", "run_text_groups", "text_length_groups", "texts_concat"]
