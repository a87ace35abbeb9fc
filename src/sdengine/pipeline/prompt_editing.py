"""Prompt editing in the sampling loop: the text conditioning of each row switched per sampler step.

:func:`row_schedules` reads every row's prompt and negative prompt with A1111's editing grammar
(:mod:`sdengine.text.schedule`, after the ``<lora:...>`` tags are taken out, as A1111 does), encodes each
distinct text of the whole call once (a cache by text, shared by prompts and negative prompts), and pads all
of a row's conditionings to one length with the empty prompt's chunk (A1111 encodes a prompt's schedule texts
in one batch, which pads them the same way). Rows without any editing get the same tensors as
``conditioner.pair``. ``positive`` (FLUX.1 Redux: its image tokens appended) makes the conditional texts'
conditioning from their encoding; where the positive and negative texts then differ in length, all are
zero-padded to the longest with ``text_len`` (each row's own count), and the network adapter runs them apart.

:class:`StepTexts` sits between the denoiser and the U-Net adapter. The sampler tells it the step
(``SamplerStep.index``, 0-based over the steps that run: img2img counts from its first step, as A1111's
denoiser counter does), classifier-free guidance tells it which rows are conditional (``row_kinds``), and it
replaces the ``crossattn`` (and ``vector``) rows by that step's texts before the U-Net (and any ControlNet)
reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError
from sdengine.prompts import extract_lora_tags, pad_to_length
from sdengine.text.conditioners import Conditioning, TextConditioner, cat_conditioning
from sdengine.text.schedule import prompt_schedule, text_at_step

TEXT_KEYS = ("crossattn", "vector", "text_len")  # what a text decides; "concat" (inpainting) is not text


@dataclass
class RowSchedule:
    """One row's texts over the steps: A1111's ``(end_at_step, text)`` lists and the conditioning of each text
    (every one ``length`` tokens long); ``positive``: the prompt texts' own where they differ from ``encoded``
    (FLUX.1 Redux's image tokens appended)."""

    prompt: list[tuple[int, str]]
    negative: list[tuple[int, str]]
    encoded: dict[str, Conditioning]
    length: int
    positive: dict[str, Conditioning] = field(default_factory=dict)

    @property
    def edits(self) -> bool:
        return len(self.prompt) > 1 or len(self.negative) > 1

    def texts_at(self, index: int) -> tuple[str, str]:
        """(prompt text, negative text) at sampler step ``index`` (0-based)."""
        return text_at_step(self.prompt, index), text_at_step(self.negative, index)

    def at(self, index: int) -> tuple[Conditioning, Conditioning]:
        p, n = self.texts_at(index)
        return (self.positive[p] if p in self.positive else self.encoded[p]), self.encoded[n]


def row_schedules(
    conditioner: TextConditioner,
    prompts: Sequence[str],
    negatives: Sequence[str],
    steps: int,
    *,
    clip_skip: int = 1,
    note: Callable[[str], None],
    positive: Callable[[Conditioning], Conditioning] | None = None,
) -> list[RowSchedule] | None:
    """Every row's schedule, or None when no prompt or negative prompt of the call edits (the plain path
    then runs unchanged). ``positive``: the conditional texts' conditioning made from their encoding."""
    parsed: dict[tuple[str, str], list[tuple[int, str]]] = {}  # each text read (and noted) once per call

    def schedule(text: str, what: str) -> list[tuple[int, str]]:
        if (what, text) not in parsed:
            plain, _ = extract_lora_tags(text)  # A1111 takes extra-network tags out before the schedule
            parsed[what, text] = prompt_schedule(plain, steps, on_literal=_prefixed(note, what))
        return parsed[what, text]

    plans = [(schedule(p, "prompt"), schedule(n, "negative prompt")) for p, n in zip(prompts, negatives, strict=True)]
    if all(len(p) == 1 and len(n) == 1 for p, n in plans):
        return None

    cache: dict[str, Conditioning] = {}

    def encode(text: str, what: str) -> Conditioning:
        if text not in cache:
            cache[text] = conditioner.encode(text, what=what, clip_skip=clip_skip, note=note)
        return cache[text]

    rows = []
    for p_sched, n_sched in plans:
        encoded: dict[str, Conditioning] = {}
        for what, sched in (("prompt", p_sched), ("negative prompt", n_sched)):
            for _, text in sched:
                encoded[text] = encode(text, what)
        length = max(int(c["crossattn"].shape[1]) for c in encoded.values())
        if any(int(c["crossattn"].shape[1]) != length for c in encoded.values()):
            empty = encode("", "prompt")["crossattn"]
            encoded = {t: {**c, "crossattn": pad_to_length(c["crossattn"], length, empty)} for t, c in encoded.items()}
        own: dict[str, Conditioning] = {}
        if positive is not None:
            own = {text: positive(encoded[text]) for _, text in p_sched}
            encoded = {text: encoded[text] for _, text in n_sched}  # the negative texts as encoded
            length = _apart(own, encoded)
        rows.append(RowSchedule(p_sched, n_sched, encoded, length, own))
    return rows


def _apart(*groups: dict[str, Conditioning]) -> int:
    """The longest text of ``groups``; where their texts differ in length, every one zero-padded to it in place,
    with ``text_len`` its own count (one per row, on the CPU: the network adapter runs the lengths apart)."""
    counts = {int(c["crossattn"].shape[1]) for g in groups for c in g.values()}
    length = max(counts)
    if len(counts) > 1:
        for g in groups:
            for text, c in g.items():
                t = c["crossattn"]
                own = torch.full((t.shape[0],), t.shape[1], dtype=torch.long)
                padded = torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1]))
                g[text] = {**c, "crossattn": padded, "text_len": own}
    return length


def _prefixed(note: Callable[[str], None], what: str) -> Callable[[str], None]:
    return lambda message: note(f"{what}: {message}")


def first_conditioning(rows: Sequence[RowSchedule]) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) of the rows at step 0, stacked: the sampler's keywords and the guidance's "no
    condition" value (:class:`StepTexts` replaces their text rows at every step)."""
    pairs = [r.at(0) for r in rows]
    return cat_conditioning([c for c, _ in pairs]), cat_conditioning([u for _, u in pairs])


class StepTexts:
    """``model(x, t, *, step, row_kinds, crossattn, vector=None, **kw)``: ``model`` with each row's text
    conditioning taken from ``rows`` at ``step.index``. Rows are in guidance's order: the k-th "cond" row is
    row k's prompt, the k-th "uncond" row row k's negative prompt."""

    takes_step = True
    takes_row_kinds = True

    def __init__(self, model: Callable[..., Tensor], rows: Sequence[RowSchedule]) -> None:
        self.model = model
        self.rows = list(rows)
        self.inner_step = bool(getattr(model, "takes_step", False))
        self.inner_row_kinds = bool(getattr(model, "takes_row_kinds", False))
        self._stacked: dict[tuple[str, ...], dict[str, Tensor]] = {}

    def texts(self, index: int, kinds: Sequence[str]) -> tuple[str, ...]:
        counts = {"cond": 0, "uncond": 0}
        out = []
        for kind in kinds:
            j = counts[kind]
            counts[kind] += 1
            p, n = self.rows[j % len(self.rows)].texts_at(index)  # a block of rows again (PAG, ip2p)
            out.append(p if kind == "cond" else n)
        return tuple(out)

    def stacked(self, index: int, kinds: Sequence[str], keys: Sequence[str]) -> dict[str, Tensor]:
        texts = self.texts(index, kinds)
        key = (*kinds, "|", *texts)
        got = self._stacked.get(key)
        if got is None:
            counts = {"cond": 0, "uncond": 0}
            parts = []
            for kind in kinds:
                j = counts[kind]
                counts[kind] += 1
                c, u = self.rows[j % len(self.rows)].at(index)
                parts.append(c if kind == "cond" else u)
            got = {k: torch.cat([part[k] for part in parts]) for k in keys}
            self._stacked[key] = got
        return got

    def __call__(self, x: Tensor, t: Tensor, *, step: Any = None, row_kinds: Sequence[str] | None = None, **cond: Any):
        if step is None:
            raise GenerationError("prompt editing needs the sampler's step; sample through sdengine.diffusion.sampling")
        kinds = tuple(row_kinds) if row_kinds is not None else ("cond",) * x.shape[0]
        if len(kinds) != x.shape[0] or any(k not in ("cond", "uncond") for k in kinds):
            raise GenerationError(f"prompt editing got row kinds {kinds!r} for a batch of {x.shape[0]}")
        keys = [k for k in TEXT_KEYS if cond.get(k) is not None]
        cond.update(self.stacked(int(step.index), kinds, keys))
        if self.inner_step:
            cond["step"] = step
        if self.inner_row_kinds:
            cond["row_kinds"] = row_kinds
        return self.model(x, t, **cond)


__all__ = ["TEXT_KEYS", "RowSchedule", "StepTexts", "first_conditioning", "row_schedules"]
