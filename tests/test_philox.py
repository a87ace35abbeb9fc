"""Philox4x32-10 and the normal transform of torch's CUDA ``randn`` (sdengine.diffusion.philox), A1111's "NV"
random source: known answers, properties, and (on a GPU machine) equality with ``torch.randn(device="cuda")``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdengine.diffusion.philox import PhiloxGenerator, make_generator, philox4x32_10, philox_randn, randn

# Random123's known-answer vectors (DEShawResearch/random123, examples/kat_vectors, the three "philox4x32 10"
# lines): counter (4 words), key (2 words), expected output (4 words).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip

# A1111's modules/rng_philox.py docstring: the expected output of Generator(seed=0).randn((3, 4)), the numbers of
# torch.manual_seed(0); torch.randn((3, 4), device="cuda") on an NVIDIA card.
A1111_SEED0_3x4 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox4x32_10_matches_random123_known_answers(counter, key, expected):
    out = philox4x32_10(np.array(counter, dtype=np.uint64)[:, None], np.array(key, dtype=np.uint64)[:, None])
    assert [int(v) for v in out[:, 0]] == list(expected)


def test_all_kat_blocks_at_once_equal_one_by_one():
    counters = np.array([c for c, _, _ in KAT], dtype=np.uint64).T
    keys = np.array([k for _, k, _ in KAT], dtype=np.uint64).T
    assert philox4x32_10(counters, keys).T.tolist() == [list(e) for _, _, e in KAT]


def test_seed_0_gives_a1111s_documented_cuda_numbers():
    got = PhiloxGenerator(0).randn((3, 4))
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    # float32 rounding: the GPU's transform is float32 with a fast sine, ours float64 rounded to float32
    torch.testing.assert_close(got, torch.tensor(A1111_SEED0_3x4), rtol=0, atol=1e-6)


def test_normal_transform_has_standard_normal_moments_and_no_infinities():
    x = philox_randn(1234, (200_000,)).double()
    assert torch.isfinite(x).all()
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.var()) - 1.0) < 0.015
    # symmetric and with normal tails: about 4.55 % beyond 2 sigma
    assert abs(float((x.abs() > 2).double().mean()) - 0.0455) < 0.003


def test_draws_are_deterministic_per_seed_and_offset_and_move_on_each_call():
    g = PhiloxGenerator(42)
    first, second = g.randn((1, 4, 8, 8)), g.randn((1, 4, 8, 8))
    assert g.offset == 2
    assert torch.equal(first, philox_randn(42, (1, 4, 8, 8), offset=0))
    assert torch.equal(second, philox_randn(42, (1, 4, 8, 8), offset=1))
    assert not torch.equal(first, second)
    assert not torch.equal(first, philox_randn(43, (1, 4, 8, 8)))
    # element i depends on its index only: a longer draw starts with the shorter one
    assert torch.equal(philox_randn(42, (300,))[:256], first.flatten())
    assert torch.equal(g.manual_seed(42).randn((1, 4, 8, 8)), first)


def test_seeds_are_taken_modulo_2_64_as_manual_seed_takes_them():
    assert torch.equal(philox_randn(-1, (16,)), philox_randn(2**64 - 1, (16,)))
    assert not torch.equal(philox_randn(2**32, (16,)), philox_randn(0, (16,)))  # the key's high word counts


def test_make_generator_and_randn_dispatch_on_the_source():
    cpu = make_generator(7, "cpu")
    assert torch.equal(randn((2, 3), cpu), torch.randn((2, 3), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(randn((2, 3), make_generator(7, "nv")), philox_randn(7, (2, 3)))
    with pytest.raises(ValueError, match="unknown noise source"):
        make_generator(7, "gpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed,shape", [(0, (3, 4)), (1234567, (1, 4, 64, 64)), (2**40 + 5, (1, 4, 128, 128))])
def test_equals_torch_randn_on_cuda(seed, shape):  # pragma: no cover - CI has no GPU
    """The NV numbers are CUDA's: start noise and the next two (per-step) draws of one generator."""
    gen = torch.Generator("cuda").manual_seed(seed)
    ours = PhiloxGenerator(seed)
    for _ in range(3):
        cuda = torch.randn(shape, generator=gen, device="cuda").cpu()
        torch.testing.assert_close(ours.randn(shape), cuda, rtol=0, atol=2e-6)
