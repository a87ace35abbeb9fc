"""NVIDIA's random numbers on any device: Philox4x32-10 and the normal transform of ``torch.randn`` on CUDA.

A1111 draws its noise, by default (``randn_source: "GPU"``), with ``torch.randn(..., device="cuda")``: torch's
CUDA generator, which is cuRAND's Philox4x32-10 counter-based generator. Its ``"NV"`` source reproduces those
numbers on any device (its ``modules/rng_philox.py``), so that a seed gives the same image on a CPU, a Mac or
an NVIDIA card. :class:`PhiloxGenerator` draws the same numbers, so sdengine (which otherwise draws with the
CPU generator, A1111's ``"CPU"`` source) can reproduce images made with A1111's GPU or NV source.

How torch draws ``randn(shape, device="cuda")`` from ``manual_seed(seed)`` (its ``calc_execution_policy`` and
``distribution_nullary_kernel``, blocks of 256 threads, at most as many threads as the card keeps resident: SMs
x max threads per SM), for tensors of at most one value per thread:

* element ``i`` is drawn by thread ``i`` from cuRAND's Philox state ``curand_init(seed, subsequence=i,
  offset)``: the Philox key is the 64-bit seed (low word, high word) and the counter is
  ``(offset / 4 low, offset / 4 high, i low, i high)``;
* one 10-round Philox block gives four 32-bit words ``(x, y, z, w)``; the element is the first output of
  cuRAND's Box-Muller on ``(x, y)``: ``u = x 2^-32 + 2^-33``, ``v = y 2^-32 2pi + 2^-33 2pi``,
  ``sqrt(-2 ln u) sin v`` (z and w are not used);
* every such ``randn`` call moves the generator's Philox offset on by 4 (``curand4_engine_calls``, one counter
  block), so the n-th call (0-based) of a generator uses ``offset / 4 = n``.

A tensor of more values than the card's resident threads (SD 1.x's 4x64x64 latent is 16384 values, SDXL's 4x128x128
65536: more than, e.g., the 43008 threads of a 28-SM RTX 3060) takes the other three normals of each thread's block
for the values past the thread count, and its offset moves on further: torch's numbers then depend on the card.
A1111's NV source (and so this module) keeps one value per thread whatever the size: its numbers are those of a
card with enough threads (an A100 keeps 221184).

A1111's NV source computes exactly that, counting calls per generator (``counter[0] = offset``, one per
``randn``), the transform in float64 from float32 constants, rounded to float32; :func:`philox4x32_10` and
:func:`box_muller` do the same, so a seed's numbers equal A1111's NV numbers, and CUDA's to float32 rounding
(the GPU computes the transform in float32 with its fast sine, so the last bit or two may differ).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Philox4x32's multipliers and Weyl key increments (Salmon et al. 2011, Random123's philox.h)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_MASK64 = (1 << 64) - 1
# cuRAND's Box-Muller constants as float32 (CURAND_2POW32_INV and CURAND_2POW32_INV_2PI), widened to float64
_INV32 = float(np.float32(2.3283064e-10))
_INV32_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32_10(counter: np.ndarray, key: np.ndarray, rounds: int = ROUNDS) -> np.ndarray:
    """Philox4x32 with ``rounds`` rounds (10: Philox4x32-10) of N blocks at once: ``counter`` (4, N) and ``key``
    (2, N) of 32-bit words, as unsigned integers; returns the (4, N) output words as uint32. The round is
    Random123's: ``(hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))``, the key bumped by the Weyl
    constants between rounds."""
    c = [np.asarray(counter[j], dtype=np.uint64) & _MASK32 for j in range(4)]
    k0 = np.asarray(key[0], dtype=np.uint64) & _MASK32
    k1 = np.asarray(key[1], dtype=np.uint64) & _MASK32
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    for r in range(rounds):
        if r:
            k0 = (k0 + np.uint64(PHILOX_W[0])) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W[1])) & _MASK32
        p0 = c[0] * m0  # a 32 x 32 bit product fits in 64 bits
        p1 = c[2] * m1
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _MASK32]
    return np.stack(c).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cuRAND's Box-Muller first output for 32-bit words ``x``, ``y``: ``sqrt(-2 ln u) sin v`` with ``u`` in
    (0, 1) and ``v`` in (0, 2pi) (never 0, so never an infinity), computed in float64 and rounded to float32."""
    u = x.astype(np.float64) * _INV32 + _INV32 / 2
    v = y.astype(np.float64) * _INV32_2PI + _INV32_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


def philox_randn(seed: int, shape: Sequence[int], offset: int = 0) -> Tensor:
    """``torch.randn(shape, device="cuda")`` of a generator seeded with ``seed`` after ``offset`` earlier calls
    (float32, on the CPU). ``seed`` is taken modulo 2**64 as torch's ``manual_seed`` takes it."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n >= 2**32:
        raise ValueError(f"a Philox draw of {n} values is more than 2**32 (shape {shape})")
    seed = int(seed) & _MASK64
    offset = int(offset)
    idx = np.arange(n, dtype=np.uint64)
    counter = np.zeros((4, n), dtype=np.uint64)
    counter[0] = offset & 0xFFFFFFFF
    counter[1] = (offset >> 32) & 0xFFFFFFFF
    counter[2] = idx
    key = np.empty((2, n), dtype=np.uint64)
    key[0] = seed & 0xFFFFFFFF
    key[1] = seed >> 32
    words = philox4x32_10(counter, key)
    return torch.from_numpy(box_muller(words[0], words[1]).reshape(shape))


class PhiloxGenerator:
    """A generator drawing NVIDIA's numbers (A1111's ``rng_philox.Generator``): :meth:`randn` is what
    ``torch.randn(shape, device="cuda")`` gives after ``torch.manual_seed(seed)`` and :attr:`offset` earlier
    calls. Stands in for a row's ``torch.Generator`` where sdengine draws a row's noise
    (:func:`sdengine.diffusion.samplers.row_noise`): the start noise is its first call, each ancestral step's
    noise the next."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) & _MASK64
        self.offset = 0

    def manual_seed(self, seed: int) -> PhiloxGenerator:
        """Reseed and restart (as ``torch.Generator.manual_seed``); returns the generator."""
        self.seed = int(seed) & _MASK64
        self.offset = 0
        return self

    def initial_seed(self) -> int:
        return self.seed

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """The next standard-normal draw of ``shape`` (on the CPU)."""
        out = philox_randn(self.seed, shape, self.offset)
        self.offset += 1
        return out if dtype == torch.float32 else out.to(dtype)

    def __repr__(self) -> str:
        return f"PhiloxGenerator(seed={self.seed}, offset={self.offset})"


NoiseGenerator = torch.Generator | PhiloxGenerator


def make_generator(seed: int, source: str = "cpu") -> NoiseGenerator:
    """A row's generator for a noise source: ``"cpu"`` torch's CPU generator (A1111's ``CPU``), ``"nv"``
    :class:`PhiloxGenerator` (A1111's ``NV``, and its default ``GPU`` on an NVIDIA card)."""
    if source == "nv":
        return PhiloxGenerator(seed)
    if source == "cpu":
        return torch.Generator("cpu").manual_seed(int(seed))
    raise ValueError(f"unknown noise source {source!r}: 'cpu' or 'nv'")


def randn(shape: Sequence[int], generator: NoiseGenerator, dtype: torch.dtype = torch.float32) -> Tensor:
    """``randn(shape)`` from either kind of generator, on the CPU: THE draw every row noise goes through."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype)
