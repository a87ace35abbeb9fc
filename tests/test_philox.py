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
    assert float((got - torch.tensor(A1111_SEED0_3x4)).abs().max()) < 1e-6


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


# ------------------------------------------------------------------------ the samplers and the pipeline


def test_ancestral_step_noise_continues_each_rows_philox_generator():
    """A1111's ImageRNG: the start noise is each row generator's first draw, each ancestral step's noise the next
    ones (offsets 1, 2, ...), per row."""
    from sdengine.diffusion.samplers import NoiseBank, row_noise, sample_euler_a

    seeds, shape, sigmas = [11, 2**33 + 3], (4, 6, 6), torch.tensor([8.0, 3.0, 1.0, 0.0])
    gens = [PhiloxGenerator(s) for s in seeds]
    start = row_noise(gens, shape)
    assert torch.equal(start, torch.cat([philox_randn(s, (1, *shape)) for s in seeds]))
    denoiser = lambda x, sigma: 0.5 * x  # noqa: E731
    out = sample_euler_a(denoiser, start * 8.0, sigmas, generators=gens)
    assert [g.offset for g in gens] == [3, 3]  # one draw per step with noise (the last, to 0, draws none)
    bank = torch.stack([torch.cat([philox_randn(s, (1, *shape), offset=k) for s in seeds]) for k in (1, 2, 3)])
    again = sample_euler_a(denoiser, start * 8.0, sigmas, generators=NoiseBank(bank, 2))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    cpu = sample_euler_a(denoiser, start * 8.0, sigmas, generators=[torch.Generator().manual_seed(s) for s in seeds])
    assert not torch.allclose(out, cpu)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    from sdengine.pipeline import load_pipeline

    return load_pipeline(str(tiny_sd1_folder), device="cpu")


FAST = {"steps": 2, "sampler": "euler", "schedule": "normal", "progress": False, "width": 32, "height": 32}


def _start_noise(pipe, reference, **kw):
    """The start noise of a deterministic Euler run, taken back from its first step (x1 = d + (x0 - d) s1/s0),
    and its difference from ``reference(shape)`` times the pipeline's start scale (the same for both sources)."""
    seen = []
    pipe("a cat", callback=lambda info: seen.append((info.sigma, info.latents, info.denoised)), **FAST, **kw)
    (s0, x1, d), (s1, _, _) = seen[0], seen[1]
    x0 = d + (x1 - d) * (s0 / s1)
    reference = reference(x0.shape)
    scale = float((x0 * reference).sum() / (reference * reference).sum())
    return scale, float((x0 - scale * reference).abs().max())


def test_noise_source_nv_draws_the_start_noise_from_philox_and_writes_rng_nv(pipe):
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    philox = lambda shape: philox_randn(77, shape)  # noqa: E731
    cpu = lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(77))  # noqa: E731
    scale_nv, off_nv = _start_noise(pipe, philox, seed=77, noise_source="nv")
    scale_cpu, off_cpu = _start_noise(pipe, cpu, seed=77)
    assert off_nv < 1e-4 and off_cpu < 1e-4 and scale_nv == pytest.approx(scale_cpu, rel=1e-5)
    made = pipe("a cat", seed=77, noise_source="nv", **FAST)
    assert "RNG: NV" in made.infotexts[0]
    assert "RNG" not in pipe("a cat", seed=77, **FAST).infotexts[0]
    kwargs = to_generate_kwargs(parse_parameters(made.infotexts[0]))
    assert kwargs["noise_source"] == "nv"
    np.testing.assert_array_equal(pipe(**kwargs, progress=False).arrays, made.arrays)


def test_variation_seed_noise_follows_the_noise_source():
    from sdengine.diffusion.variation import variation_noise

    noise = philox_randn(5, (1, 4, 8, 8))
    torch.testing.assert_close(variation_noise(noise, [9], 1.0, "nv"), philox_randn(9, (1, 4, 8, 8)))
    cpu_sub = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(variation_noise(noise, [9], 1.0), cpu_sub)


@pytest.mark.parametrize(
    "text,source", [("RNG: NV", "nv"), ("RNG: GPU", "nv"), ("RNG: CPU", "cpu")], ids=["nv", "gpu", "cpu"]
)
def test_a1111_rng_field_maps_to_the_noise_source(text, source):
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    parsed = parse_parameters(f"a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, {text}")
    assert to_generate_kwargs(parsed)["noise_source"] == source


def test_bad_rng_and_noise_source_are_one_line_errors(pipe):
    from sdengine.errors import GenerationError
    from sdengine.metadata import MetadataError, parse_parameters, to_generate_kwargs

    parsed = parse_parameters("a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, RNG: TPU")
    with pytest.raises(MetadataError, match="RNG: 'TPU' is not one of GPU, NV, CPU"):
        to_generate_kwargs(parsed)
    with pytest.raises(GenerationError, match="unknown noise_source 'gpu'"):
        pipe("a cat", noise_source="gpu", **FAST)


def test_cli_noise_source_nv_and_from_png(tiny_sd1_folder, tmp_path):
    from PIL import Image

    from sdengine.cli import main

    common = ["--model", str(tiny_sd1_folder), "--no-progress", "--width", "32", "--height", "32"]
    args = ["generate", "a cat", "--steps", "2", "--sampler", "euler_a", "--seed", "5", *common]
    assert main([*args, "--noise-source", "nv", "--out", str(tmp_path / "nv")]) == 0
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    made = tmp_path / "nv" / "00000-5.png"
    assert "RNG: NV" in Image.open(made).info["parameters"]
    nv = np.asarray(Image.open(made))
    assert not np.array_equal(nv, np.asarray(Image.open(tmp_path / "cpu" / "00000-5.png")))
    assert main(["generate", "--from-png", str(made), *common, "--out", str(tmp_path / "again")]) == 0
    np.testing.assert_array_equal(nv, np.asarray(Image.open(tmp_path / "again" / "00000-5.png")))
