"""Variation seeds (A1111's subseed / subseed_strength): slerp of the start noise, recorded and read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.diffusion.variation import slerp, variation_noise
from sdengine.errors import GenerationError
from sdengine.metadata import parse_parameters, to_generate_kwargs

FAST = {"steps": 3, "sampler": "euler", "schedule": "normal", "progress": False}


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(slerp(0.0, a, b), a) and torch.equal(slerp(1.0, a, b), b)
    mid = slerp(0.5, a, b)
    # on the great circle: the norm stays that of the draws (a straight mix loses ~30% at 0.5)
    na, nb = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
    nm, nlin = mid.flatten(1).norm(dim=1), (0.5 * (a + b)).flatten(1).norm(dim=1)
    assert (nm >= 0.98 * torch.minimum(na, nb)).all() and (nm <= 1.02 * torch.maximum(na, nb)).all()
    assert (nlin < 0.8 * torch.minimum(na, nb)).all()
    # A1111 slerps each (channel, column) vector along the height: for columns of unit norm the midpoint is at
    # equal angles from both ends and keeps the unit norm
    ua, ub = a / a.norm(dim=2, keepdim=True), b / b.norm(dim=2, keepdim=True)
    um = slerp(0.5, ua, ub)
    cos = lambda x, y: (x * y).sum(2)  # noqa: E731
    assert torch.allclose(cos(um, ua), cos(um, ub), atol=1e-5)
    assert torch.allclose(um.norm(dim=2), torch.ones(2, 4, 8), atol=1e-5)
    # parallel inputs do not divide by zero; rows of another shape are one vector each
    assert torch.allclose(slerp(0.3, a, a), a, atol=1e-5)
    fa, fb = a.flatten(1), b.flatten(1)
    fa, fb = fa / fa.norm(dim=1, keepdim=True), fb / fb.norm(dim=1, keepdim=True)
    fm = slerp(0.5, fa, fb)
    assert fm.shape == (2, 256) and torch.allclose((fm * fa).sum(1), (fm * fb).sum(1), atol=1e-5)
    assert torch.allclose(fm.norm(dim=1), torch.ones(2), atol=1e-5)


def _a1111_slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's modules/rng.py slerp, as it is called there: on one image's (C, H, W) noise."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def test_variation_noise_is_a1111s():
    # A1111 (CPU random source) draws randn(seed, (4, h, w)) and randn(subseed, ...) and slerps them along the
    # height; a slerp of the whole flattened tensor gave other noise, so another image for the same seeds
    for strength in (0.1, 0.5, 0.83):
        noise = torch.cat([torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
        got = variation_noise(noise, [9, 10], strength)
        for i, (seed, sub) in enumerate(((5, 9), (6, 10))):
            low = torch.randn((4, 8, 12), generator=torch.Generator().manual_seed(seed))
            high = torch.randn((4, 8, 12), generator=torch.Generator().manual_seed(sub))
            torch.testing.assert_close(got[i], _a1111_slerp(strength, low, high), atol=1e-6, rtol=0)


def test_variation_noise_rows_use_their_own_subseed():
    noise = torch.zeros(2, 4, 4, 4)
    out = variation_noise(noise, [7, 8], 1.0)
    for i, s in enumerate([7, 8]):
        want = torch.randn((1, 4, 4, 4), generator=torch.Generator("cpu").manual_seed(s))
        assert torch.equal(out[i : i + 1], want)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    from sdengine.pipeline import load_pipeline

    return load_pipeline(str(tiny_sd1_folder), device="cpu")


def test_strength_0_is_the_plain_image_and_1_the_subseeds(pipe):
    plain = pipe("a cat", seed=5, **FAST)
    zero = pipe("a cat", seed=5, subseed=9, subseed_strength=0.0, **FAST)
    np.testing.assert_array_equal(plain.arrays, zero.arrays)
    assert "Variation seed" not in zero.infotexts[0]
    one = pipe("a cat", seed=5, subseed=9, subseed_strength=1.0, **FAST)
    of_subseed = pipe("a cat", seed=9, **FAST)  # a deterministic sampler: only the start noise is random
    np.testing.assert_array_equal(one.arrays, of_subseed.arrays)
    half = pipe("a cat", seed=5, subseed=9, subseed_strength=0.5, **FAST)
    assert np.abs(half.arrays - plain.arrays).mean() > 1e-3 and np.abs(half.arrays - one.arrays).mean() > 1e-3
    # a batch: every row keeps the seed and row i takes subseed + i (A1111's rule: variations of one image), as it
    # would alone; the old seed + i made each row another picture
    batch = pipe("a cat", seed=5, subseed=9, subseed_strength=0.5, batch_size=2, **FAST)
    alone = pipe("a cat", seed=5, subseed=10, subseed_strength=0.5, **FAST)
    np.testing.assert_allclose(batch.arrays[1], alone.arrays[0], atol=2e-3)
    p = parse_parameters(batch.infotexts[1])
    assert (p["Seed"], p["Variation seed"], p["Variation seed strength"]) == ("5", "10", "0.5")
    assert batch.seeds == [5, 5] and parse_parameters(batch.infotexts[0])["Variation seed"] == "9"


def test_infotext_round_trips(pipe):
    made = pipe("a cat", seed=5, subseed=9, subseed_strength=0.3, **FAST)
    kwargs = to_generate_kwargs(parse_parameters(made.infotexts[0]))
    assert (kwargs["subseed"], kwargs["subseed_strength"]) == (9, 0.3)
    again = pipe(**kwargs, progress=False)
    np.testing.assert_array_equal(made.arrays, again.arrays)
    assert again.infotexts[0] == made.infotexts[0]
    # A1111's own text: a random variation seed drawn is reported
    drawn = pipe("a cat", seed=5, subseed=-1, subseed_strength=0.2, **FAST)
    assert int(parse_parameters(drawn.infotexts[0])["Variation seed"]) >= 0


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"subseed_strength": 1.5}, "subseed_strength must be in [0, 1]"),
        ({"subseed": -3, "subseed_strength": 0.5}, "subseed must be an integer"),
    ],
)
def test_bad_values_are_one_line(pipe, bad, message):
    with pytest.raises(GenerationError) as e:
        pipe("a cat", **bad, **FAST)
    assert message in str(e.value)


def test_cli_subseed_and_from_png(tiny_sd1_folder, tmp_path):
    from sdengine.cli import main

    out = tmp_path / "o"
    assert (
        main(
            [
                "generate",
                "a cat",
                "--model",
                str(tiny_sd1_folder),
                "--steps",
                "3",
                "--sampler",
                "euler",
                "--seed",
                "5",
                "--subseed",
                "9",
                "--subseed-strength",
                "0.4",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    made = out / "00000-5.png"
    text = Image.open(made).info["parameters"]
    assert "Variation seed: 9, Variation seed strength: 0.4" in text
    again = tmp_path / "again"
    assert (
        main(
            ["generate", "--from-png", str(made), "--model", str(tiny_sd1_folder), "--out", str(again), "--no-progress"]
        )
        == 0
    )
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(again / "00000-5.png")))


def test_a_subseed_whose_last_row_passes_the_range_says_so():
    """subseed 2**64 - 1 with 2 rows was refused as "got 18446744073709551615" although that value is in range:
    the last row's subseed (subseed + 1) is the one out of range, and the message says so."""
    from sdengine.errors import GenerationError
    from sdengine.pipeline.request import MAX_SEED, GenerationRequest

    req = GenerationRequest(prompt="x", seed=1, subseed=MAX_SEED, subseed_strength=0.5, batch_size=2)
    with pytest.raises(GenerationError, match=r"subseed 18446744073709551615 is out of range for 2 rows"):
        req.precheck()
    GenerationRequest(prompt="x", seed=1, subseed=MAX_SEED, subseed_strength=0.5, batch_size=1).precheck()
    with pytest.raises(GenerationError, match=r"subseed must be an integer in \[0, 2\*\*64 - 1\]"):
        GenerationRequest(prompt="x", seed=1, subseed=MAX_SEED + 1, subseed_strength=0.5).precheck()
