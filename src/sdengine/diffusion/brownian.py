"""Brownian-tree noise: the SDE samplers' per-step noise as AUTOMATIC1111 and ComfyUI draw it.

Both hand their DPM++ SDE, DPM++ 2M SDE (and its Heun form) and DPM++ 3M SDE samplers k-diffusion's
``BrownianTreeNoiseSampler``: the noise of a step from sigma to sigma' is the increment of one Brownian motion over
[sigma', sigma] divided by ``sqrt(|sigma' - sigma|)``, a standard normal draw that depends on the seed and on the
two sigmas only, not on how many draws came before. That motion is torchsde's ``BrownianTree`` (a
``BrownianInterval`` with a dyadic "halfway" tree, tolerance 1e-6, entropy pool of 24 words); this module makes the
same numbers without torchsde:

* The tree's root is the interval [t0, t1] (both rounded to 6 decimals) with the increment
  ``sqrt(t1 - t0) * Z``; each interval that a query has to cut splits at its rounded midpoint m, and the increment
  over its left part is the Brownian bridge value ``(m - s) W / (e - s) + sqrt((m - s)(e - m) / (e - s)) Z``, the
  right part's ``W`` minus that (W the interval's increment over [s, e]).
* Every Z is ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(k))`` with k the first word of
  ``numpy.random.SeedSequence(entropy=seed, spawn_key=(key, depth), pool_size=24).generate_state(n)`` for the
  interval being cut (``key``: its left/right path from the root as a binary number, ``depth`` its level; the root
  draws its own increment from ``SeedSequence(entropy=seed, pool_size=24)``).
* A query [ta, tb] (rounded to 6 decimals) is the sum, left to right, of the increments of the fewest tree
  intervals that cover it. Every interval is fixed by the seed alone, so the answer does not depend on the order or
  on the other queries: the tree is consistent whichever way it is read.

Draws are float32 on the CPU whatever the model's device, as ComfyUI's default samplers (``cpu=True``) draw them;
A1111 and ComfyUI's ``_gpu`` samplers on a GPU draw the same tree with the CUDA generator, whose numbers differ.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sdengine.errors import UsageError

TOLERANCE = 1e-6  # torchsde.BrownianTree's tol: query points and interval ends are rounded to 6 decimals
POOL_SIZE = 24  # its pool_size: the SeedSequence entropy pool
# Increments kept, least recently used dropped first (torchsde keeps 45); a dropped one is recomputed to the same
# numbers. A sampler's run reads about 33 new intervals a step and 96 kept cover its reuse; a big latent keeps fewer.
CACHE_SIZE = 96
CACHE_BYTES = 32 * 2**20
MAX_DEPTH = 128  # far below this for any t0, t1 and tolerance 1e-6 (about 30 levels): a guard, not a limit


class _Node:
    """One interval of the tree: its ends, where it splits (once it has), and the seed of its split's draw."""

    __slots__ = ("start", "end", "key", "depth", "parent", "is_left", "mid", "seed", "left", "right")

    def __init__(self, start: float, end: float, key: int, depth: int, parent: _Node | None, is_left: bool) -> None:
        self.start, self.end = start, end
        self.key, self.depth = key, depth
        self.parent, self.is_left = parent, is_left
        self.mid: float | None = None
        self.seed = 0
        self.left: _Node | None = None
        self.right: _Node | None = None


class BrownianTree:
    """A Brownian motion on [t0, t1] fixed by ``seed`` (torchsde's ``BrownianTree(t0, zeros(shape), t1,
    entropy=seed)``): :meth:`increment` gives ``W(tb) - W(ta)`` of shape ``shape``, float32 on the CPU."""

    def __init__(self, t0: float, t1: float, shape: Sequence[int], seed: int) -> None:
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 > t1:
            raise UsageError(f"a Brownian tree needs t0 <= t1, got {t0!r} and {t1!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise UsageError(f"a Brownian tree's seed must be a non-negative integer, got {seed!r}")
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        self.digits = -int(math.log10(TOLERANCE))
        self.root = _Node(self._round(t0), self._round(t1), 0, 0, None, False)
        w_seed = np.random.SeedSequence(entropy=self.seed, pool_size=POOL_SIZE).generate_state(3)[0]
        self.root_w = self._normal(int(w_seed)) * math.sqrt(t1 - t0)  # the unrounded ends, as torchsde
        self.cache: OrderedDict[_Node, Tensor] = OrderedDict()
        self.cache_size = max(45, min(CACHE_SIZE, CACHE_BYTES // max(4 * math.prod(self.shape), 1)))

    @property
    def t0(self) -> float:
        return self.root.start

    @property
    def t1(self) -> float:
        return self.root.end

    def _round(self, t: float) -> float:
        return round(t, self.digits)

    def _normal(self, seed: int) -> Tensor:
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(self.shape, dtype=torch.float32, generator=g)

    def _cut(self, node: _Node) -> None:
        """Split ``node`` at its rounded midpoint (once); its children get the path keys below it."""
        if node.mid is not None:
            return
        if node.depth >= MAX_DEPTH:
            raise UsageError(f"Brownian tree deeper than {MAX_DEPTH} levels at [{node.start}, {node.end}]")
        mid = self._round(0.5 * (node.end + node.start))
        state = np.random.SeedSequence(
            entropy=self.seed, spawn_key=(node.key, node.depth), pool_size=POOL_SIZE
        ).generate_state(4)
        node.mid, node.seed = mid, int(state[0])
        node.left = _Node(node.start, mid, 2 * node.key, node.depth + 1, node, True)
        node.right = _Node(mid, node.end, 2 * node.key + 1, node.depth + 1, node, False)

    def _cover(self, ta: float, tb: float) -> list[_Node]:
        """The fewest tree intervals whose union is [ta, tb] (ends on the rounded grid), left to right."""
        out: list[_Node] = []
        todo: list[tuple[_Node, float, float]] = [(self.root, ta, tb)]
        while todo:
            node, a, b = todo.pop()
            if a == node.start and b == node.end:
                out.append(node)
                continue
            self._cut(node)
            assert node.mid is not None and node.left is not None and node.right is not None
            if b <= node.mid:
                todo.append((node.left, a, b))
            elif a >= node.mid:
                todo.append((node.right, a, b))
            else:  # the right part goes on the stack first: the left one is taken (and listed) first
                todo.append((node.right, node.mid, b))
                todo.append((node.left, a, node.mid))
        return out

    def _value(self, node: _Node) -> Tensor:
        """The increment over ``node``: from the nearest ancestor whose increment is known, bridge by bridge."""
        path = []
        at: _Node | None = node
        while at is not None and at.parent is not None and at not in self.cache:
            path.append(at)
            at = at.parent
        w = self.root_w if at is None or at.parent is None else self.cache[at]
        if at is not None and at in self.cache:
            self.cache.move_to_end(at)
        for child in reversed(path):
            parent = child.parent
            assert parent is not None and parent.mid is not None
            span = 1 / (parent.end - parent.start)
            left_len, right_len = parent.mid - parent.start, parent.end - parent.mid
            mean = left_len * w * span
            left_w = mean + math.sqrt(left_len * right_len * span) * self._normal(parent.seed)
            w = left_w if child.is_left else w - left_w
            self.cache[child] = w
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return w

    def increment(self, ta: float, tb: float) -> Tensor:
        """``W(tb) - W(ta)`` for ``ta <= tb`` (clamped into [t0, t1], then rounded to the tree's 6 decimals)."""
        ta, tb = float(ta), float(tb)
        if ta > tb:
            raise UsageError(f"Brownian increment needs ta <= tb, got {ta!r} > {tb!r}")
        ta = min(max(ta, self.root.start), self.root.end)
        tb = min(max(tb, self.root.start), self.root.end)
        ta, tb = self._round(ta), self._round(tb)
        if ta == tb:  # an empty query (also every query of a tree over one point)
            return torch.zeros(self.shape, dtype=torch.float32)
        parts = self._cover(ta, tb)
        w = self._value(parts[0])
        for node in parts[1:]:
            w = w + self._value(node)
        return w


class BrownianNoise:
    """k-diffusion's ``BrownianTreeNoiseSampler`` over [sigma_min, sigma_max]: :meth:`between` is a step's standard
    normal noise, of shape ``shape`` (B, C, H, W). ``seeds``: one per batch row, each row its own tree (A1111's
    per-image seeds, ``per_row``), or one for the whole batch, one tree of the batch's shape (ComfyUI's seed).
    Handed to a sampler in place of its generators (``len`` is the batch), the SDE samplers read it
    (:meth:`sdengine.diffusion.samplers.Loop.step_noise`); the others draw nothing from it."""

    def __init__(self, sigma_min: float, sigma_max: float, shape: Sequence[int], seeds: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise UsageError(f"Brownian noise needs a batched shape (B, ...), got {shape}")
        self.batch = shape[0]
        self.per_row = len(seeds) == self.batch and self.batch > 1
        if len(seeds) != 1 and not self.per_row:
            raise UsageError(f"Brownian noise takes one seed or one per row: {len(seeds)} seeds for {self.batch} rows")
        lo, hi = (float(sigma_min), float(sigma_max))
        self.sign = 1 if lo < hi else -1
        lo, hi = min(lo, hi), max(lo, hi)
        if self.per_row:
            self.trees = [BrownianTree(lo, hi, shape[1:], int(s)) for s in seeds]
        else:
            self.trees = [BrownianTree(lo, hi, shape, int(seeds[0]))]
        self.used = 0

    def __len__(self) -> int:
        return self.batch

    def between(self, sigma: float, sigma_next: float) -> Tensor:
        """The noise of the step from ``sigma`` to ``sigma_next``: ``(W(sigma_next) - W(sigma)) /
        sqrt(|sigma_next - sigma|)``, with k-diffusion's float32 arithmetic (the sigmas are taken as float32)."""
        self.used += 1
        a = torch.tensor(float(sigma), dtype=torch.float32)
        b = torch.tensor(float(sigma_next), dtype=torch.float32)
        lo, hi, sign = (a, b, 1) if bool(a < b) else (b, a, -1)
        parts = [tree.increment(float(lo), float(hi)) for tree in self.trees]
        w = torch.stack(parts) if self.per_row else parts[0]
        return w * (self.sign * sign) / (b - a).abs().sqrt()


@dataclass(frozen=True)
class BrownianSpec:
    """Which Brownian noise a run's SDE sampler draws (:func:`sdengine.diffusion.sampling.sample`): the tree
    seeds (one per row, A1111's; or one for the batch, ComfyUI's) and the sigma range the trees span (A1111: the
    whole grid's lowest non-zero sigma and its highest; ComfyUI: those of the sigmas its sampler is handed)."""

    seeds: tuple[int, ...]
    sigma_min: float
    sigma_max: float

    @staticmethod
    def over(seeds: Sequence[int], sigmas: Tensor) -> BrownianSpec:
        """The spec for ``seeds`` over ``sigmas`` (k-diffusion's ``sigmas[sigmas > 0].min(), sigmas.max()``)."""
        values = sigmas.detach().to("cpu", torch.float32).reshape(-1)
        positive = values[values > 0]
        if positive.numel() == 0:
            raise UsageError("Brownian noise needs a sigma above 0")
        return BrownianSpec(tuple(int(s) for s in seeds), float(positive.min()), float(values.max()))

    def noise(self, shape: Sequence[int]) -> BrownianNoise:
        return BrownianNoise(self.sigma_min, self.sigma_max, shape, self.seeds)


__all__ = ["POOL_SIZE", "TOLERANCE", "BrownianNoise", "BrownianSpec", "BrownianTree"]
