"""sdengine.diffusion.brownian: torchsde's BrownianTree numbers (what k-diffusion's BrownianTreeNoiseSampler hands
A1111's and ComfyUI's SDE samplers), made without torchsde, and the statistics of a Brownian motion.

The expected numbers were computed once with torchsde 0.2.6 (``torchsde.BrownianTree(t0, torch.zeros(shape), t1,
entropy=seed)``, and k-diffusion's ``BatchedBrownianTree`` / ``BrownianTreeNoiseSampler`` arithmetic around it); they
are float32 values, compared exactly."""

from __future__ import annotations

import random

import pytest
import torch

from sdengine.diffusion.brownian import BrownianNoise, BrownianSpec, BrownianTree
from sdengine.errors import UsageError

LO, HI = 0.0291675, 14.614642  # SD 1.5's sigma_min and sigma_max

TORCHSDE_TREE = {  # torchsde.BrownianTree(tensor(LO), zeros(2, 3), tensor(HI), entropy=1234)(a, b), a and b float32
    (LO, HI): [2.989084482192993, -0.907806932926178, -0.8516445159912109, -7.929539680480957, 3.7952706813812256,
               -5.343902587890625],
    (0.5, 3.25): [0.4009180963039398, -1.6542649269104004, 1.2732751369476318, -2.421001672744751,
                  2.7408089637756348, -0.680406391620636],
    (7.0, 7.5): [-0.20303142070770264, 1.7384445667266846, -0.2842142581939697, -1.4122533798217773,
                 0.6398626565933228, 0.04239698126912117],
    (LO, 0.0292): [0.0050712451338768005, 0.0032324399799108505, 0.00976474117487669, -0.0015172919956967235,
                   0.001461527543142438, 0.0054713888093829155],
}  # fmt: skip

SIGMAS = [14.614642, 6.0, 1.5, 0.3, 0.0291675]
KDIFFUSION_NOISE = {  # BrownianTreeNoiseSampler(x of shape (2, 1, 1, 2), LO, HI, seed)(SIGMAS[i], SIGMAS[i + 1])
    (7, 8): [
        [1.4414037466049194, -1.2147852182388306, 0.36596375703811646, -0.3833857476711273],
        [1.6613916158676147, -1.9226493835449219, -0.511641263961792, 1.4849637746810913],
        [0.33297666907310486, -1.2950888872146606, 1.2716574668884277, -0.8932450413703918],
        [-0.7645493745803833, -0.676246166229248, 0.6198834180831909, 0.5499342083930969],
    ],
    (7,): [
        [1.4414037466049194, -1.2147852182388306, 0.47680914402008057, -2.0779972076416016],
        [1.6613916158676147, -1.9226493835449219, -0.8321493268013, -1.9579555988311768],
        [0.33297666907310486, -1.2950888872146606, -0.13173319399356842, -2.4794063568115234],
        [-0.7645493745803833, -0.676246166229248, 1.3658347129821777, 2.5237772464752197],
    ],
}


def f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def test_tree_gives_torchsdes_numbers():
    tree = BrownianTree(f32(LO), f32(HI), (2, 3), 1234)
    for (a, b), want in TORCHSDE_TREE.items():
        got = tree.increment(f32(a), f32(b))
        assert got.dtype == torch.float32 and got.shape == (2, 3)
        assert torch.equal(got.flatten(), torch.tensor(want, dtype=torch.float32)), (a, b, got)


@pytest.mark.parametrize("seeds", list(KDIFFUSION_NOISE))
def test_noise_gives_kdiffusions_numbers(seeds):
    """One tree per row (A1111's per-image seeds) or one tree for the batch (ComfyUI's seed): the first row is the
    same either way (the same generator, the same stream), the second differs."""
    noise = BrownianSpec.over(seeds, torch.tensor(SIGMAS + [0.0])).noise((2, 1, 1, 2))
    assert len(noise) == 2
    for i, want in enumerate(KDIFFUSION_NOISE[seeds]):
        got = noise.between(SIGMAS[i], SIGMAS[i + 1])
        assert got.shape == (2, 1, 1, 2)
        assert torch.equal(got.flatten(), torch.tensor(want, dtype=torch.float32)), (i, got)


def test_tree_reads_the_same_whatever_the_order():
    """Every interval of the tree is fixed by the seed: a fresh tree read backwards, or shuffled, or after its
    cache has long dropped the first answers, gives the same tensors bit for bit."""
    rng = random.Random(3)
    points = sorted({round(rng.uniform(LO, HI), 4) for _ in range(12)} | {LO, HI})
    queries = [(points[i], points[i + 1]) for i in range(len(points) - 1)] + [(LO, HI), (points[3], points[-4])]
    forward = BrownianTree(LO, HI, (5,), 99)
    first = [forward.increment(a, b) for a, b in queries]
    assert len(forward.cache) == forward.cache_size  # full: the first answers' intervals have been dropped
    again = [forward.increment(a, b) for a, b in queries]  # recomputed
    backward = BrownianTree(LO, HI, (5,), 99)
    last = [backward.increment(a, b) for a, b in reversed(queries)][::-1]
    shuffled_tree = BrownianTree(LO, HI, (5,), 99)
    order = list(range(len(queries)))
    rng.shuffle(order)
    shuffled = dict(zip(order, [shuffled_tree.increment(*queries[k]) for k in order], strict=True))
    for k in range(len(queries)):
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], last[k]) and torch.equal(first[k], shuffled[k])
    # the pieces of a cut add up to the whole (up to float32 rounding of the sums)
    whole = sum(first[: len(points) - 1], torch.zeros(5))
    assert torch.allclose(whole, first[len(points) - 1], atol=1e-5)
    other = BrownianTree(LO, HI, (5,), 100)
    assert not torch.equal(other.increment(LO, HI), first[len(points) - 1])  # another seed, another path


def test_increments_have_the_statistics_of_brownian_motion():
    """Over 40000 independent coordinates: increments over disjoint intervals are centred, have variance equal to
    the interval's length, and are uncorrelated; the noise handed to a sampler is standard normal."""
    n = 40000
    tree = BrownianTree(LO, HI, (n,), 5)
    cuts = [LO, 0.1, 0.7, 2.0, 2.05, 9.0, HI]
    parts = [tree.increment(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
    for (a, b), w in zip(zip(cuts, cuts[1:], strict=False), parts, strict=True):
        length = b - a
        assert abs(float(w.mean())) < 5 * (length / n) ** 0.5
        assert float(w.var()) == pytest.approx(length, rel=0.05)
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            corr = float((parts[i] * parts[j]).mean()) / (float(parts[i].std()) * float(parts[j].std()))
            assert abs(corr) < 0.03, (i, j, corr)
    noise = BrownianNoise(LO, HI, (1, n), [5]).between(2.0, 0.7)
    assert abs(float(noise.mean())) < 0.03 and float(noise.std()) == pytest.approx(1.0, rel=0.03)
    # the step's noise is the tree's increment over it, negated (sigma falls) and divided by sqrt of its length
    assert torch.allclose(noise[0], -parts[2] / (2.0 - 0.7) ** 0.5, atol=1e-5)


def test_bad_trees_are_refused_in_one_line():
    for args, words in (
        ((2.0, 1.0, (3,), 1), "t0 <= t1"),
        ((0.0, float("nan"), (3,), 1), "t0 <= t1"),
        ((0.0, 1.0, (3,), -1), "non-negative integer"),
        ((0.0, 1.0, (3,), 1.5), "non-negative integer"),
    ):
        with pytest.raises(UsageError, match=words) as info:
            BrownianTree(*args)
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="ta <= tb"):
        BrownianTree(0.0, 1.0, (3,), 1).increment(0.5, 0.25)
    with pytest.raises(UsageError, match="one seed or one per row"):
        BrownianNoise(0.1, 1.0, (3, 4), [1, 2])
    with pytest.raises(UsageError, match="a sigma above 0"):
        BrownianSpec.over([1], torch.zeros(3))
    # a tree over one point (a one-step grid) answers zeros: its sampler's only step goes to 0 and draws nothing
    assert torch.equal(BrownianTree(0.5, 0.5, (2,), 1).increment(0.5, 0.5), torch.zeros(2))
