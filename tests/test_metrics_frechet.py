"""Frechet distance: closed forms for Gaussians, invariances, an independent eigvals path, scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdengine.metrics.frechet import (
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    sqrt_psd,
)


def _random_spd(rng: np.random.Generator, d: int, jitter: float = 0.1) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + jitter * np.eye(d)


def _random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_identical_sets_zero() -> None:
    x = np.random.default_rng(0).normal(size=(500, 16)) * 3 + 1
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_features(torch.from_numpy(x).float(), x) == pytest.approx(0.0, abs=1e-4)


def test_closed_form_commuting_covariances() -> None:
    # C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T  =>  FD = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(1)
    d = 12
    q = _random_rotation(rng, d)
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    expect = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expect, rel=1e-10)


def test_closed_form_2x2_non_commuting() -> None:
    # For 2x2, Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M with nonnegative eigenvalues.
    c1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    c2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(c1 @ c2, c2 @ c1)
    m = c1 @ c2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expect, rel=1e-12)


def test_gaussian_samples_mean_shift() -> None:
    # Samples of N(m1, I) and N(m2, I): FD -> |m1 - m2|^2 (covariance terms cancel as N grows).
    rng = np.random.default_rng(2)
    d, n = 8, 40000
    m1, m2 = np.zeros(d), np.array([1.0, -1.0, 0.5, 0, 0, 0, 0, 2.0])
    fa = rng.normal(size=(n, d)) + m1
    fb = rng.normal(size=(n, d)) + m2
    # sampling std of the mean term is about 2 |m1 - m2| sqrt(2 / n) = 0.035: allow ~5 sigma
    assert frechet_distance_features(fa, fb) == pytest.approx(np.sum((m1 - m2) ** 2), abs=0.2)
    # Whitened samples (sample mean exactly 0, sample covariance exactly I) make it exact.
    z = rng.normal(size=(500, d))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    assert frechet_distance_features(z + m1, z[::-1] + m2) == pytest.approx(np.sum((m1 - m2) ** 2), rel=1e-9)
    # Scale-only difference: N(0, I) vs N(0, 4I) -> d * (1 - 2)^2 = d
    fc = 2.0 * rng.normal(size=(n, d))
    assert frechet_distance_features(fa, fc) == pytest.approx(d, rel=0.02)


def test_invariances_and_symmetry() -> None:
    rng = np.random.default_rng(3)
    d = 10
    fa = rng.normal(size=(300, d)) @ rng.normal(size=(d, d))
    fb = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) + 0.5
    base = frechet_distance_features(fa, fb)
    assert base > 1.0
    assert frechet_distance_features(fb, fa) == pytest.approx(base, rel=1e-9)
    shift = rng.normal(size=d) * 10
    assert frechet_distance_features(fa + shift, fb + shift) == pytest.approx(base, rel=1e-9)
    q = _random_rotation(rng, d)
    assert frechet_distance_features(fa @ q, fb @ q) == pytest.approx(base, rel=1e-9)
    assert frechet_distance_features(3 * fa, 3 * fb) == pytest.approx(9 * base, rel=1e-9)
    # order of samples does not matter
    assert frechet_distance_features(fa[::-1], fb) == pytest.approx(base, rel=1e-9)


def test_agrees_with_independent_eigvals_path() -> None:
    # Tr sqrt(C1 C2) = sum sqrt(eigvals(C1 C2)) (real, nonnegative for SPD inputs): computed without
    # our symmetric-square-root trick.
    rng = np.random.default_rng(4)
    d = 20
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    ev = np.linalg.eigvals(c1 @ c2)
    assert np.abs(ev.imag).max() < 1e-8
    expect = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(ev.real).sum()
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expect, rel=1e-9)


def test_singular_covariances_are_finite() -> None:
    # Fewer samples than dimensions -> rank-deficient covariances (the usual small-N case).
    rng = np.random.default_rng(5)
    fa, fb = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))
    fd = frechet_distance_features(fa, fb)
    assert np.isfinite(fd) and fd > 0
    z = np.zeros((64, 64))
    mu = np.zeros(64)
    assert frechet_distance(mu, z, mu, z) == 0.0
    c = _random_spd(rng, 64)
    # one degenerate distribution: FD = Tr(C) (sqrt term vanishes)
    assert frechet_distance(mu, z, mu, c) == pytest.approx(np.trace(c), rel=1e-10)


def test_sqrt_psd_and_feature_stats() -> None:
    rng = np.random.default_rng(6)
    c = _random_spd(rng, 7)
    s = sqrt_psd(c)
    np.testing.assert_allclose(s @ s, c, atol=1e-12)
    np.testing.assert_allclose(s, s.T, atol=0)
    x = rng.normal(size=(50, 7))
    mu, cov = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), atol=1e-12)


def test_bad_inputs() -> None:
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_features(x[:1], x)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance_features(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance_features(np.zeros(5), x)
    y = x.copy()
    y[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_features(y, x)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_agrees_with_scipy_sqrtm() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(7)
    d = 32
    fa = rng.normal(size=(200, d)) @ rng.normal(size=(d, d))
    fb = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) + 0.3
    mu1, c1 = feature_stats(fa)
    mu2, c2 = feature_stats(fb)
    covmean = linalg.sqrtm(c1 @ c2).real
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expect, rel=1e-6)
