"""Frechet distance between feature distributions (the formula behind FID), numpy only.

For Gaussians N(m1, C1) and N(m2, C2) (Dowson & Landau 1982; FID: Heusel et al. 2017,
arXiv:1706.08500)::

    FD = |m1 - m2|^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^{1/2})

``C1 C2`` is not symmetric, so its square root is not computed directly (scipy's ``sqrtm`` on it
returns tiny imaginary parts and needs patching for singular C1). Instead we use
``Tr((C1 C2)^{1/2}) = Tr((S C2 S)^{1/2})`` with ``S = C1^{1/2}``: ``C1 C2 = S (S C2)`` has the same
eigenvalues as ``(S C2) S = S C2 S`` (AB and BA share their spectrum), which is symmetric PSD, so
two symmetric eigendecompositions in float64 give the trace as a sum of square roots of clipped
eigenvalues.

``fd_fmnist`` applies it to the Fashion-MNIST classifier's 128-d features ("FD_fmnist"); these
numbers are comparable only with other FD_fmnist numbers from the same shipped weights.
"""

from __future__ import annotations

import numpy as np
import torch

from sdengine.metrics.classifier import FashionClassifier, features, predict

__all__ = [
    "class_accuracy",
    "fd_fmnist",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_features",
    "sqrt_psd",
]


def _as_2d_float64(features: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 samples for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` in float64 (the same as ``np.cov``)."""
    x = _as_2d_float64(features, "features")
    mu = x.mean(axis=0)
    xc = x - mu
    cov = xc.T @ xc / (x.shape[0] - 1)
    return mu, cov


def sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; negative round-off eigenvalues -> 0."""
    a = (a + a.T) / 2  # remove asymmetry from round-off before eigh, which only reads one triangle
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2), computed in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}")
    s1 = sqrt_psd(cov1)
    m = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean
    # Exact FD is >= 0; round-off can leave a tiny negative number for identical inputs.
    return float(max(fd, 0.0))


def frechet_distance_features(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """FD between two feature sets ``(Na, D)`` and ``(Nb, D)`` (Gaussian fit to each)."""
    mu_a, cov_a = feature_stats(_as_2d_float64(features_a, "features_a"))
    mu_b, cov_b = feature_stats(_as_2d_float64(features_b, "features_b"))
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance(mu_a, cov_a, mu_b, cov_b)


def fd_fmnist(images_a: torch.Tensor, images_b: torch.Tensor, model: FashionClassifier | None = None) -> float:
    """FD_fmnist: FD of the shipped Fashion-MNIST classifier's 128-d features.

    Images are float ``(N, 1, 32, 32)`` (or 28x28) in ``[-1, 1]``. Use a few thousand images per set:
    the covariance is 128x128 and the estimate is biased upwards for small N.
    """
    return frechet_distance_features(features(images_a, model), features(images_b, model))


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, model: FashionClassifier | None = None) -> float:
    """Fraction of images the shipped classifier assigns to ``labels`` (class-conditional check)."""
    labels = torch.as_tensor(labels).long().cpu()
    pred = predict(images, model)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} images but labels of shape {tuple(labels.shape)}")
    return (pred == labels).float().mean().item()
