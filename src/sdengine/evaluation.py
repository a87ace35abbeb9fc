"""Offline quality measures for the Fashion-MNIST DDPM.

FD-FMNIST is computed like FID, with the penultimate features of the project's own Fashion-MNIST
classifier in place of Inception's: the Frechet distance between Gaussians fitted to the features of
generated images and of the 10,000 test images. Class accuracy is the classifier's top-1 accuracy on
class-conditional samples, each judged against the class it was asked for.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from sdengine.errors import UsageError

from .ddpm import PixelDDPM


def reference_features(device: torch.device | str = "cpu") -> torch.Tensor:
    from .data.fashion_mnist import load_fashion_mnist, to_model_range
    from .metrics.classifier import features, load_classifier

    images, _ = load_fashion_mnist("test")
    clf = load_classifier().to(device)
    return features(to_model_range(images), clf)


def score_images(
    images01: torch.Tensor, labels: torch.Tensor, ref_features: torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """(FD-FMNIST, class accuracy) of images ``(N, 1, 28, 28)`` in ``[0, 1]`` asked to show ``labels``."""
    from .metrics.classifier import features, load_classifier, predict
    from .metrics.frechet import frechet_distance_features

    clf = load_classifier().to(device)
    x = images01 * 2 - 1
    fd = frechet_distance_features(features(x, clf), ref_features)
    acc = (predict(x, clf) == labels.cpu()).float().mean().item()
    return float(fd), float(acc)


def evaluate_ddpm(
    model: str | PixelDDPM,
    *,
    n: int = 1000,
    sampler: str = "ddim",
    steps: int = 50,
    schedule: str = "normal",
    seed: int = 0,
    guidance_scale: float = 1.0,
    device: str | torch.device = "cpu",
    ref_features: torch.Tensor | None = None,
    batch_size: int = 500,
) -> dict[str, Any]:
    """Sample ``n`` class-conditional images (labels cycle 0..9) and score them."""
    m = model if isinstance(model, PixelDDPM) else PixelDDPM.load(model, device=device)
    if not m.num_classes:
        raise UsageError("eval ddpm needs a class-conditional Fashion-MNIST model")
    if n < 2:
        raise UsageError("n must be at least 2 to fit a Gaussian")
    labels = torch.arange(n) % m.num_classes
    t = time.perf_counter()
    imgs = m.generate(
        labels.tolist(),
        sampler=sampler,
        steps=steps,
        schedule=schedule,
        seed=seed,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    )
    seconds = time.perf_counter() - t
    ref = ref_features if ref_features is not None else reference_features(device)
    fd, acc = score_images(imgs, labels, ref, device)
    return {
        "sampler": sampler,
        "steps": steps,
        "schedule": schedule,
        "n": n,
        "cfg": guidance_scale,
        "fd": fd,
        "accuracy": acc,
        "seconds": seconds,
    }
